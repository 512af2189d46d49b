"""A plain Celery app that tracks job state the way Celery users get it: the like-for-like
baseline for the platform in ``bench/drain.py``.

Configured exactly like ``bench/raw_app.py`` (same broker, JSON, late acks, prefetch 1, ten
priority lists polled most-urgent-first) except that each job's state is recorded in Celery's
own result backend, on the same Redis: ``result_backend`` is the broker URL,
``task_ignore_result=False`` and ``task_track_started=True``, so the worker writes STARTED when
a job begins and SUCCESS when it ends (keys ``celery-task-meta-<id>``): the equivalent of what
the platform's Postgres ledger records per job. No task events (``-E``), as for the others.
The broker is ``BENCH_REDIS_URL`` (set by ``bench/drain.py``), else ``REDIS_URL``.
"""

from __future__ import annotations

import os

from celery import Celery

BROKER_URL = os.environ.get("BENCH_REDIS_URL") or os.environ.get(
    "REDIS_URL", "redis://127.0.0.1:6379/14"
)

app = Celery("bench_raw_tracked", broker=BROKER_URL, backend=BROKER_URL)
app.conf.update(
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "priority_steps": list(range(10)),
        "queue_order_strategy": "priority",
    },
    result_backend=BROKER_URL,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=False,
    task_track_started=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop_tracked")
def noop_tracked() -> None:
    return None
