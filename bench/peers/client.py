"""The producer side of one peer, run in a process of its own by the harness::

    python -m bench.peers.client PEER enqueue N
    python -m bench.peers.client PEER bulk N [CALLABLE]
    python -m bench.peers.client PEER latency SAMPLES KEY GAP_S
    python -m bench.peers.client PEER wait SAMPLES GAP_S          (platform only)

Between two probes the client pauses a random time, uniform in 0 to 2 x GAP_S, so that no
probe is sent at a fixed phase of a worker that polls (arq).

Each prints one line ``BENCH-PEERS <json>``: ``{"seconds": s}`` for ``enqueue``/``bulk`` (or
``{"unsupported": why}``), ``{"latencies": [...]}`` (seconds) for ``latency``/``wait``.
A fresh process per action: no peer's imports or state (Dramatiq's global broker, arq's event
loop, the platform's pools) leak into another's figures; imports and connections are made
before the clock starts. The peer's Redis is ``BENCH_PEERS_REDIS_URL``; the Celery and
platform apps read theirs from the environment the harness sets.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.peers.probe import redis_url

QUEUE = "bench-peers"
CELERY_QUEUE = "bench-peers-celery"
CELERY_ROUNDTRIP_QUEUE = "bench-peers-celery-roundtrip"
CELERY_OVERLAP_QUEUE = "bench-peers-celery-overlap"
PLATFORM_QUEUE = "bench-peers-platform"
BLPOP_TIMEOUT_S = 30


class Producer:
    """Enqueue a no-op job or a probe; ``bulk`` when the peer has a bulk enqueue."""

    def noop(self) -> None:
        raise NotImplementedError

    def probe(self, key: str) -> None:
        raise NotImplementedError

    #: why the peer has no bulk row (subclasses with a bulk enqueue override ``bulk``)
    no_bulk = "no bulk enqueue API"

    def bulk(self, n: int) -> None:
        raise UnsupportedError(self.no_bulk)

    def close(self) -> None:
        return None


class UnsupportedError(Exception):
    """The peer has no such operation (the row is skipped with this note)."""


class CeleryProducer(Producer):
    no_bulk = "no bulk enqueue API (group().apply_async() publishes one message per job)"

    def __init__(self, variant: str = "celery") -> None:
        from bench.peers import celery_app

        if variant == "celery-roundtrip":  # one Postgres write before each body
            self._noop, self._probe = celery_app.noop_roundtrip, celery_app.probe_roundtrip
            self._queue = CELERY_ROUNDTRIP_QUEUE
        elif variant == "celery-overlap":  # the write sent by the main process, relayed
            from bench.peers import celery_overlap_app as overlap

            self._noop, self._probe = overlap.noop_overlap, overlap.probe_overlap
            self._queue = CELERY_OVERLAP_QUEUE
        else:
            self._noop, self._probe = celery_app.noop, celery_app.probe
            self._queue = CELERY_QUEUE
        self._producer = celery_app.app.producer_pool.acquire(block=True)
        self._producer.connection.default_channel  # noqa: B018 - connect before the clock
        self._release = self._producer.release

    def noop(self) -> None:
        self._noop.apply_async(queue=self._queue, producer=self._producer)

    def probe(self, key: str) -> None:
        self._probe.apply_async(args=(key,), queue=self._queue, producer=self._producer)

    def close(self) -> None:
        self._release()


class PlatformProducer(Producer):
    def __init__(self, bulk_callable: str | None = None) -> None:
        import synth_workers
        from bench.peers import platform_tasks

        self._enqueue = synth_workers.enqueue
        self._bulk_spec = bulk_callable
        self.noop_name = platform_tasks.noop.name
        self.probe_name = platform_tasks.probe.name
        # connected before the clock, as Celery's producer is: the ledger's pool and the
        # broker's Redis (synth_workers.wirelane)
        from synth_workers import app, wirelane

        with app.ledger.connection():
            pass
        wirelane.lane(app)

    def noop(self) -> Any:
        return self._enqueue(self.noop_name, {}, queue=PLATFORM_QUEUE)

    def probe(self, key: str) -> None:
        self._enqueue(self.probe_name, {"key": key}, queue=PLATFORM_QUEUE)

    def bulk(self, n: int) -> None:
        spec = self._bulk_spec or "synth_workers:enqueue_many"
        enqueue_many = resolve(spec)
        payloads: list[dict[str, Any]] = [{} for _ in range(n)]
        try:
            enqueue_many(self.noop_name, payloads, queue=PLATFORM_QUEUE)
        except TypeError as exc:  # a signature other than (task_name, payloads, *, queue=)
            raise UnsupportedError(
                f"{spec}(task_name, payloads, queue=...) was refused: {exc}"
            ) from exc


def resolve(spec: str) -> Callable[..., Any]:
    """``module:attribute`` -> the object; :class:`UnsupportedError` when it does not exist."""
    import importlib

    module_name, _, attr = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UnsupportedError(f"{spec} does not exist ({exc})") from None
    if not callable(found):
        raise UnsupportedError(f"{spec} is not callable")
    return found  # type: ignore[no-any-return]


class HueyProducer(Producer):
    no_bulk = "no bulk enqueue API"

    def __init__(self) -> None:
        from bench.peers.huey_app import huey, noop, probe

        self._noop, self._probe = noop, probe
        huey.storage.conn.ping()

    def noop(self) -> None:
        self._noop()

    def probe(self, key: str) -> None:
        self._probe(key)


class DramatiqProducer(Producer):
    no_bulk = "no bulk enqueue API (group().run() sends one message per job)"

    def __init__(self) -> None:
        from bench.peers.dramatiq_app import broker, noop, probe

        self._noop, self._probe = noop, probe
        broker.client.ping()

    def noop(self) -> None:
        self._noop.send()

    def probe(self, key: str) -> None:
        self._probe.send(key)


class RQProducer(Producer):
    def __init__(self) -> None:
        import redis
        from rq import Queue

        from bench.peers import rq_jobs

        self._jobs = rq_jobs
        self._queue = Queue(QUEUE, connection=redis.Redis.from_url(redis_url()))

    def noop(self) -> None:
        self._queue.enqueue(self._jobs.noop)

    def probe(self, key: str) -> None:
        self._queue.enqueue(self._jobs.probe, key)

    def bulk(self, n: int) -> None:
        prepared = [self._queue.prepare_data(self._jobs.noop) for _ in range(n)]
        self._queue.enqueue_many(prepared)


class ArqProducer(Producer):
    """arq's enqueue is a coroutine: each call is awaited in turn on one event loop."""

    no_bulk = "no bulk enqueue API"

    def __init__(self) -> None:
        from arq import create_pool

        from bench.peers.arq_app import settings

        self._loop = asyncio.new_event_loop()
        self._pool = self._loop.run_until_complete(create_pool(settings()))

    def noop(self) -> None:
        self._loop.run_until_complete(self._pool.enqueue_job("noop"))

    def enqueue_n(self, n: int) -> None:
        async def run() -> None:
            for _ in range(n):
                await self._pool.enqueue_job("noop")

        self._loop.run_until_complete(run())

    def probe(self, key: str) -> None:
        self._loop.run_until_complete(self._pool.enqueue_job("probe", key))

    def close(self) -> None:
        self._loop.run_until_complete(self._pool.aclose())
        self._loop.close()


def producer_for(peer: str, bulk_callable: str | None) -> Producer:
    kind = peer.split("-", maxsplit=1)[0]
    if kind == "celery":
        return CeleryProducer(peer)
    if kind == "platform":
        return PlatformProducer(bulk_callable)
    if kind == "huey":
        return HueyProducer()
    if kind == "dramatiq":
        return DramatiqProducer()
    if kind == "rq":
        return RQProducer()
    if kind == "arq":
        return ArqProducer()
    raise SystemExit(f"unknown peer {peer!r}")


def enqueue(producer: Producer, n: int) -> dict[str, Any]:
    """N single enqueues, one after the other; the seconds they took."""
    t = time.perf_counter()
    if isinstance(producer, ArqProducer):
        producer.enqueue_n(n)  # one event loop run for all: no per-call loop overhead
    else:
        for _ in range(n):
            producer.noop()
    return {"seconds": time.perf_counter() - t}


def bulk(producer: Producer, n: int) -> dict[str, Any]:
    try:
        t = time.perf_counter()
        producer.bulk(n)
        return {"seconds": time.perf_counter() - t}
    except UnsupportedError as exc:
        return {"unsupported": str(exc)}


def latency(producer: Producer, samples: int, key: str, gap: float) -> dict[str, Any]:
    """Enqueue a probe, wait until it has started, pause ``gap`` (workers idle), again."""
    import redis

    client = redis.Redis.from_url(redis_url())
    client.delete(key)
    found: list[float] = []
    for i in range(samples + 1):  # the first, which warms the connections, is not kept
        t0 = time.time()
        producer.probe(key)
        popped = client.blpop([key], timeout=BLPOP_TIMEOUT_S)
        if popped is None:
            raise SystemExit(f"probe did not start within {BLPOP_TIMEOUT_S}s")
        if i:
            found.append(float(popped[1]) - t0)
        time.sleep(random.uniform(0, 2 * gap))  # noqa: S311 - timing jitter
    return {"latencies": found}


def wait(producer: Producer, samples: int, gap: float) -> dict[str, Any]:
    """Platform: enqueue a no-op and ``wait()`` for its result; enqueue -> wait() returned."""
    if not isinstance(producer, PlatformProducer):
        return {"unsupported": "wait() is the platform's"}
    found: list[float] = []
    for i in range(samples + 1):  # the first, which warms the connections, is not kept
        t0 = time.time()
        producer.noop().wait(timeout=BLPOP_TIMEOUT_S)
        if i:
            found.append(time.time() - t0)
        time.sleep(random.uniform(0, 2 * gap))  # noqa: S311 - timing jitter
    return {"latencies": found}


def main(argv: list[str]) -> int:
    peer, action, *rest = argv
    bulk_callable = rest[1] if action == "bulk" and len(rest) > 1 else None
    producer = producer_for(peer, bulk_callable)
    try:
        if action == "enqueue":
            out = enqueue(producer, int(rest[0]))
        elif action == "bulk":
            out = bulk(producer, int(rest[0]))
        elif action == "latency":
            out = latency(producer, int(rest[0]), rest[1], float(rest[2]))
        elif action == "wait":
            out = wait(producer, int(rest[0]), float(rest[1]))
        else:
            raise SystemExit(f"unknown action {action!r}")
    finally:
        producer.close()
    print("BENCH-PEERS " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
