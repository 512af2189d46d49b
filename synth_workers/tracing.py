"""OpenTelemetry tracing (extra: ``synth-workers[otel]``), only when it is installed.

With ``opentelemetry-instrumentation-celery`` present and ``SYNTH_TRACING`` on (the
default), ``install(app)`` instruments Celery once per process: a send gets a producer
span (``apply_async/<task>``) whose context is injected into the message's headers (the
ledger keeps them, so every re-publish carries it), and a worker continues that trace in a
consumer span (``run/<task>``); jobs a job sends are children of its span, so a chain is one
trace. The platform adds its own spans: ``synth.ledger.insert`` (the job's row),
``synth.publish`` (the message to Redis) and, in the worker, ``synth.ledger.claim``.

Where the spans go is the application's choice, as OpenTelemetry intends: a
``TracerProvider`` set with ``opentelemetry.trace.set_tracer_provider`` in the producer, and
in each worker process (at ``worker_process_init``, in a module the worker imports:
``SYNTH_INCLUDE``), or ``opentelemetry-instrument celery -A synth_workers worker``. Without a
provider the spans are the API's no-op ones. Nothing here is imported when the packages are
missing; every helper is then a no-op.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()
_tracer: Any = None
_enabled = False


def enable() -> bool:
    """Instrument Celery in this process and turn the platform's spans on; ``False`` (and
    nothing done) when ``opentelemetry-instrumentation-celery`` is not installed.
    Idempotent."""
    global _tracer, _enabled
    with _lock:
        if _enabled:
            return True
        try:
            from opentelemetry import trace
            from opentelemetry.instrumentation.celery import CeleryInstrumentor
        except ImportError:
            return False
        instrumentor: Any = CeleryInstrumentor()  # type: ignore[no-untyped-call]
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()
        _tracer = trace.get_tracer("synth_workers")
        _enabled = True
        return True


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    """A span named ``name`` around the block (a child of the current one), when tracing is
    enabled; ``attributes`` that are ``None`` are left out."""
    tracer = _tracer
    if tracer is None:
        yield
        return
    values = {f"synth.{k}": v for k, v in attributes.items() if v is not None}
    with tracer.start_as_current_span(name, attributes=values):
        yield
