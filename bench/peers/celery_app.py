"""Plain Celery for the peers benchmark: ``bench/raw_app.py``'s app (prefetch 1, late acks, no
result backend, JSON) plus the latency probe. Broker: ``BENCH_REDIS_URL``."""

from __future__ import annotations

from bench.peers.probe import record_start
from bench.raw_app import app, noop

__all__ = ["app", "noop", "probe"]


@app.task(name="bench.peers.probe")
def probe(key: str) -> None:
    record_start(key)
