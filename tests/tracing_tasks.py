"""Tasks the request-tracing tests run in real worker processes (tests/test_tracing.py).

With ``SYNTH_TEST_SPANS`` set, each worker pool process exports its OpenTelemetry spans to
that file, one JSON object a line (the SDK's ``ConsoleSpanExporter`` writing to a file): the
application's part of tracing, set up where OpenTelemetry says, at ``worker_process_init``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import group
from celery.signals import worker_process_init

from synth_workers import PermanentError, Task, app

log = logging.getLogger("tests.tracing_tasks")


@app.task(name="tests.tracing_tasks.first_step", bind=True)
def first_step(self: Task, n: int) -> str:
    """Step one of two: logs, reports progress, then sends step two; returns its id."""
    log.info("first step working on %s", n)
    self.progress(1, 1, message="first")
    return str(second_step.delay(n + 1).id)


@app.task(name="tests.tracing_tasks.second_step", bind=True)
def second_step(self: Task, n: int) -> int:
    log.info("second step working on %s", n)
    self.progress(1, 1, message="second")
    return n * 10


@app.task(name="tests.tracing_tasks.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="tests.tracing_tasks.double")
def double(x: int) -> int:
    return x * 2


@app.task(name="tests.tracing_tasks.total")
def total(values: list[int]) -> int:
    return sum(values)


@app.task(name="tests.tracing_tasks.fan_out")
def fan_out(n: int) -> str:
    """Sends ``n`` parts as a Celery group; returns the group's id."""
    parts = group(double.s(i) for i in range(n)).apply_async()
    return str(parts.id)


@app.task(name="tests.tracing_tasks.broken")
def broken() -> None:
    raise PermanentError("broken on purpose")


def _export_spans(**kwargs: Any) -> None:
    path = os.environ.get("SYNTH_TEST_SPANS")
    if not path:
        return
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

    out = open(path, "a", buffering=1)  # noqa: SIM115 - open for the process's life
    provider = TracerProvider()
    provider.add_span_processor(
        SimpleSpanProcessor(
            ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")
        )
    )
    trace.set_tracer_provider(provider)


worker_process_init.connect(_export_spans, weak=False, dispatch_uid="tests.tracing_tasks")
