"""The no-op job on the platform's app, loaded with ``SYNTH_INCLUDE=bench.platform_tasks``."""

from __future__ import annotations

from synth_workers import app


@app.task(name="bench.platform_noop")
def noop() -> None:
    return None
