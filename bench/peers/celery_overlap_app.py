"""Peer ``celery-overlap``: ``bench/raw_app.py``'s plain Celery app, each job's Postgres write
sent by the worker's main process as the message arrives and its answer relayed to the pool
process (``bench/overlap_app.py``). Broker: ``BENCH_REDIS_URL``."""

from __future__ import annotations

from typing import Any

from bench.overlap_app import OverlapRequest, noop_overlap, wait_relayed
from bench.peers.probe import record_start
from bench.raw_app import app

__all__ = ["app", "noop_overlap", "probe_overlap"]


@app.task(name="bench.peers.probe_overlap", bind=True, Request=OverlapRequest)
def probe_overlap(self: Any, key: str) -> None:
    wait_relayed(self.request.id)  # the job starts once its "claim" is written
    record_start(key)
