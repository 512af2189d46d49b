"""Plain Celery's probe job of ``bench/latency_parts.py`` (``celery -A bench.latency_raw``):
the app of ``bench/raw_app.py``, nothing of the platform imported."""

from __future__ import annotations

from typing import Any

from bench.latency_parts import done, stamp, stamp_signals
from bench.raw_app import app

stamp_signals()


@app.task(name="bench.latency_raw_probe", bind=True)
def probe(self: Any) -> None:
    stamp("body", self.request.id)
    done(self.request.id)
