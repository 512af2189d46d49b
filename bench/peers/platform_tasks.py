"""The platform's no-op job and latency probe (``SYNTH_INCLUDE=bench.peers.platform_tasks``)."""

from __future__ import annotations

from bench.peers.probe import record_start
from synth_workers import app


@app.task(name="bench.peers.platform_noop")
def noop() -> None:
    return None


@app.task(name="bench.peers.platform_probe")
def probe(key: str) -> None:
    record_start(key)
