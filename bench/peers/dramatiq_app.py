"""Dramatiq for the peers benchmark: ``RedisBroker`` with the default middleware (no results).
Redis: ``BENCH_PEERS_REDIS_URL``. Workers: ``dramatiq bench.peers.dramatiq_app -p P -t 8``."""

from __future__ import annotations

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from bench.peers.probe import record_start, redis_url

broker = RedisBroker(url=redis_url())
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name="bench-peers")
def noop() -> None:
    return None


@dramatiq.actor(queue_name="bench-peers")
def probe(key: str) -> None:
    record_start(key)
