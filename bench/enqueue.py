"""Enqueue benchmark: how fast a producer hands jobs over, the platform against plain Celery.

Single sends, one job per call, no worker running:

* ``enqueue``: ``synth_workers.enqueue("bench.platform_noop", {}, queue=...)`` (durable: a
  ledger row, then the message and its ``queued`` event);
* ``apply_async``: the same task's Celery-native ``apply_async(queue=...)`` on the platform;
* ``celery``: plain Celery's ``apply_async`` (``bench/raw_app.py``: Redis broker, JSON, no
  result backend), what the ratios compare with;
* ``floor``: one durable ``INSERT`` into a two-column table, then one redis-py pipeline of
  ``LPUSH`` + ``XADD``, with next to no Python;
* ``ledger-floor``: what ``enqueue`` itself puts on the wire, with no Python around it: the
  real row's ``INSERT`` (durable, into ``synth_jobs``, the statement ``enqueue`` prepares),
  the message's ``LPUSH`` and its ``queued`` event's script call in one Redis write while
  Postgres writes the row, then the row's answer. ``ledger-floor / celery`` is the most a
  durable single enqueue can reach against ``apply_async`` on the machine.

Bulk sends, many jobs per call:

* ``enqueue_many``: ``synth_workers.enqueue_many`` of ``--bulk`` jobs (chunks of 1,000);
* ``group``: ``celery.group(...)`` of ``--bulk`` signatures of the platform task, ``apply_async()``;
* ``celery-group``: the same group on plain Celery.

Rounds interleave the modes (the order rotates each round); between modes the queues are
emptied and the ledger truncated (not timed). Reported per mode: median jobs/s and range; per
round the ratio ``enqueue / celery`` and ``enqueue_many / celery-group`` (and the others), with
their median and range, and the load average at start and end (the machine is shared).

Run from the repository root, against a Redis and a Postgres database of your own (the
Redis database is flushed)::

    .venv/bin/python -m bench.enqueue --redis-url redis://127.0.0.1:6379/14 \\
        --database-url postgresql://postgres@127.0.0.1:5432/bench

Exits non-zero when a mode did not leave every job where it should (ledger rows and Redis
messages counted after each run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

QUEUE = "bench-enqueue"
SCHEMA = "synth_bench_enqueue"


def _setup_env(redis_url: str, database_url: str) -> None:
    os.environ["REDIS_URL"] = os.environ["BENCH_REDIS_URL"] = redis_url
    os.environ["DATABASE_URL"] = database_url
    os.environ["SYNTH_DB_SCHEMA"] = SCHEMA
    os.environ["SYNTH_INCLUDE"] = "bench.platform_tasks"
    os.environ.setdefault("SYNTH_LOG_LEVEL", "WARNING")


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")
    )
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--single", type=int, default=2000, help="jobs per single-send run")
    parser.add_argument("--bulk", type=int, default=10000, help="jobs per bulk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the figures as JSON here")
    opts = parser.parse_args(argv)
    if not opts.database_url:
        parser.error("--database-url (or DATABASE_URL) is needed")
    _setup_env(opts.redis_url, opts.database_url)

    import psycopg
    import redis
    from celery import group

    from bench import raw_app
    from synth_workers import app, enqueue, enqueue_many

    with psycopg.connect(opts.database_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    app.ledger.migrate()
    app.loader.import_default_modules()
    task = app.tasks["bench.platform_noop"]
    raw_task = raw_app.noop
    client = redis.Redis.from_url(opts.redis_url)

    floor_conn = psycopg.connect(opts.database_url, autocommit=True)
    floor_conn.execute(
        "CREATE TABLE IF NOT EXISTS public.synth_bench_floor (id uuid PRIMARY KEY, m jsonb)"
    )
    floor_doc = json.dumps({"headers": {"task": "bench.platform_noop", "x": "y" * 600}})

    def floor(n: int) -> None:
        """The wire floor of a durable enqueue: one INSERT (committed durably) and one
        pipelined LPUSH + XADD, with next to no Python around them."""
        for _ in range(n):
            floor_conn.execute(
                "INSERT INTO public.synth_bench_floor VALUES (gen_random_uuid(), %s)", (floor_doc,)
            )
            pipe = client.pipeline(transaction=False)
            pipe.lpush(QUEUE, floor_doc)
            pipe.xadd("bench:floor", {"kind": "queued"}, maxlen=1000, approximate=True)
            pipe.execute()

    from synth_workers import wire, wirelane
    from synth_workers.events.buffer import EventBuffer
    from synth_workers.ledger import early
    from synth_workers.lifecycle import JobEvent
    from synth_workers.states import EventKind
    from synth_workers.uuids import uuid4s

    def ledger_floor(n: int) -> None:
        """The floor of the platform's own durable enqueue: its ledger row's INSERT
        (``synth_workers.ledger.early``'s statement into the real ``synth_jobs``, committed
        durably), and while Postgres writes it one Redis write of the message's LPUSH and its
        ``queued`` event's script call (``synth_workers.wirelane``), then the INSERT's answer:
        what ``enqueue`` puts on the wire, with the message and the row made once."""
        model = wire.build(task, (), {}, {"task_id": uuid4s(1)[0], "queue": QUEUE})
        assert model is not None
        way = wirelane.lane(app)
        raws = way.raws([model]) if way is not None else None
        assert way is not None and raws is not None
        (key, text), stored = raws[0], model.stored()
        writer = next(
            w.writer for w in app.ledger.lifecycle.listeners if isinstance(w, EventBuffer)
        )
        for job_id in uuid4s(n):
            row = {
                "job_id": job_id,
                "task": task.name,
                "queue": QUEUE,
                "priority": 5,
                "payload": {},
                "args": None,
                "max_attempts": task.max_attempts,
                "user_id": None,
                "message": stored,
                "expires_at": None,
                "correlation_id": None,
                "maybe_waited": False,
            }
            event = JobEvent(EventKind.QUEUED, job_id, task=task.name, queue=QUEUE, data={})
            keys, args = writer.command([event])
            with app.ledger.connection() as conn:
                pending = early.send_insert(conn, row)
                way.execute(
                    [("EVALSHA", writer.script_sha, len(keys), *keys, *args), ("LPUSH", key, text)]
                )
                pending.result()

    def reset() -> None:
        client.flushdb()
        floor_conn.execute("TRUNCATE public.synth_bench_floor")
        with app.ledger.connection() as conn:
            conn.execute("TRUNCATE synth_jobs, synth_idempotency")

    def ledger_rows() -> int:
        with app.ledger.connection() as conn:
            row = conn.execute("SELECT count(*) FROM synth_jobs").fetchone()
        return int(row[0]) if row else 0

    def in_redis() -> int:
        return sum(int(client.llen(k)) for k in client.keys(f"{QUEUE}*"))

    def single(send: Callable[[], Any]) -> Callable[[int], None]:
        def run(n: int) -> None:
            for _ in range(n):
                send()

        return run

    modes: dict[str, tuple[str, Callable[[int], Any], bool]] = {
        "floor": ("single", floor, False),
        "ledger-floor": ("single", ledger_floor, True),
        "enqueue": (
            "single",
            single(lambda: enqueue("bench.platform_noop", {}, queue=QUEUE)),
            True,
        ),
        "apply_async": ("single", single(lambda: task.apply_async(queue=QUEUE)), True),
        "celery": ("single", single(lambda: raw_task.apply_async(queue=QUEUE)), False),
        "enqueue_many": (
            "bulk",
            lambda n: enqueue_many("bench.platform_noop", [{}] * n, queue=QUEUE),
            True,
        ),
        "group": (
            "bulk",
            lambda n: group(task.s() for _ in range(n)).apply_async(queue=QUEUE),
            True,
        ),
        "celery-group": (
            "bulk",
            lambda n: group(raw_task.s() for _ in range(n)).apply_async(queue=QUEUE),
            False,
        ),
    }
    # warm up every path (connections, declarations, prepared statements)
    for _kind, run, _ledger in modes.values():
        run(20)
    reset()

    load_start = os.getloadavg()
    rates: dict[str, list[float]] = {name: [] for name in modes}
    cpu: dict[str, list[float]] = {name: [] for name in modes}  # producer CPU µs per job
    failures: list[str] = []
    names = list(modes)
    for rnd in range(opts.rounds):
        order = names[rnd % len(names) :] + names[: rnd % len(names)]
        for name in order:
            kind, run, durable = modes[name]
            n = opts.single if kind == "single" else opts.bulk
            reset()
            started = time.perf_counter()
            cpu_started = time.process_time()
            run(n)
            took = time.perf_counter() - started
            cpu[name].append((time.process_time() - cpu_started) / n * 1e6)
            rates[name].append(_rate(n, took))
            got = in_redis()
            rows = ledger_rows() if durable else n
            if got != n or rows != n:
                failures.append(f"round {rnd + 1} {name}: {got} messages, {rows} rows for {n}")
            print(
                f"round {rnd + 1} {name:13s} {rates[name][-1]:9.0f} jobs/s "
                f"{cpu[name][-1]:7.0f} µs CPU/job",
                flush=True,
            )
    reset()
    floor_conn.execute("DROP TABLE public.synth_bench_floor")
    load_end = os.getloadavg()

    def ratio(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(rates[a], rates[b], strict=True)]

    ratios = {
        "enqueue / celery": ratio("enqueue", "celery"),
        "apply_async / celery": ratio("apply_async", "celery"),
        "enqueue_many / celery-group": ratio("enqueue_many", "celery-group"),
        "group / celery-group": ratio("group", "celery-group"),
        "enqueue_many / celery (single)": ratio("enqueue_many", "celery"),
        "enqueue / floor": ratio("enqueue", "floor"),
        "celery / floor": ratio("celery", "floor"),
        "enqueue / ledger-floor": ratio("enqueue", "ledger-floor"),
        "ledger-floor / celery": ratio("ledger-floor", "celery"),
    }
    print()
    print(
        f"python {sys.version.split()[0]}, celery {version('celery')}, kombu {version('kombu')}, "
        f"redis-py {version('redis')}, psycopg {version('psycopg')}, {os.cpu_count()} cpus"
    )
    print(f"load average (1/5/15 min) at start {load_start}, at end {load_end}")
    print(
        f"single: {opts.single} jobs per run; bulk: {opts.bulk} jobs per run; {opts.rounds} rounds"
    )
    print(f"{'mode':30s} {'median':>10s} {'min':>10s} {'max':>10s}  jobs/s   CPU µs/job")
    for name, values in rates.items():
        print(
            f"{name:30s} {statistics.median(values):10.0f} {min(values):10.0f} "
            f"{max(values):10.0f}   {statistics.median(cpu[name]):8.0f}"
        )
    print(f"{'ratio':30s} {'median':>10s} {'min':>10s} {'max':>10s}  (per round)")
    for name, values in ratios.items():
        print(
            f"{name:30s} {statistics.median(values):10.2f} {min(values):10.2f} {max(values):10.2f}"
        )
    if opts.out:
        with open(opts.out, "w") as out:
            json.dump(
                {
                    "rates": rates,
                    "ratios": ratios,
                    "load": [load_start, load_end],
                    "single": opts.single,
                    "bulk": opts.bulk,
                },
                out,
                indent=2,
            )
    for failure in failures:
        print("FAILED:", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
