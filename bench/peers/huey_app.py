"""Huey for the peers benchmark: ``RedisHuey`` with its defaults (blocking reads, results kept
only for jobs that return a value: these return ``None``). Redis: ``BENCH_PEERS_REDIS_URL``.
Consumer: ``huey_consumer bench.peers.huey_app.huey -w 2 -k process``."""

from __future__ import annotations

from huey import RedisHuey

from bench.peers.probe import record_start, redis_url

huey = RedisHuey("bench_peers", url=redis_url())


@huey.task()
def noop() -> None:
    return None


@huey.task()
def probe(key: str) -> None:
    record_start(key)
