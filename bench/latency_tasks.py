"""The platform's probe job of ``bench/latency_parts.py``, and its claim stamped
(``SYNTH_INCLUDE=bench.latency_tasks``; plain Celery's probe: ``bench/latency_raw.py``)."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init

from bench.latency_parts import done, stamp, stamp_signals
from synth_workers import app

stamp_signals()


@app.task(name="bench.latency_platform_probe", bind=True)
def platform_probe(self: Any) -> None:
    stamp("body", self.request.id)
    done(self.request.id)


@worker_process_init.connect
def _stamp_claims(**_: Any) -> None:
    """The platform's claim (``Fencing.claim``), stamped before and after: what the pool
    process waits for before the job's body (a round trip to Postgres)."""
    owner = next(k for k in type(app.ledger).__mro__ if "claim" in k.__dict__)
    claim = owner.claim

    def stamped(ledger: Any, job_id: str, *args: Any, **kwargs: Any) -> Any:
        stamp("claim", job_id)
        try:
            return claim(ledger, job_id, *args, **kwargs)
        finally:
            stamp("claimed", job_id)

    owner.claim = stamped
