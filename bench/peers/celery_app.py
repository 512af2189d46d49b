"""Plain Celery for the peers benchmark: ``bench/raw_app.py``'s app (prefetch 1, late acks, no
result backend, JSON) plus the latency probe. Broker: ``BENCH_REDIS_URL``.

Peer ``celery-roundtrip`` runs the same app's ``*_roundtrip`` tasks: each writes one row to
Postgres first (``bench.raw_app.roundtrip``), where the platform claims its job."""

from __future__ import annotations

from bench.peers.probe import record_start
from bench.raw_app import app, noop, noop_roundtrip, roundtrip

__all__ = ["app", "noop", "noop_roundtrip", "probe", "probe_roundtrip"]


@app.task(name="bench.peers.probe")
def probe(key: str) -> None:
    record_start(key)


@app.task(name="bench.peers.probe_roundtrip")
def probe_roundtrip(key: str) -> None:
    roundtrip()  # the job starts once its "claim" is written, as the platform's does
    record_start(key)
