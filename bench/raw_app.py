"""A plain Celery app: the baseline the platform is compared with in ``bench/drain.py``.

Configured like the platform where it matters for throughput (same broker, JSON, late acks,
prefetch 1, no results, ten priority lists polled most-urgent-first), and nothing more.
The broker is ``BENCH_REDIS_URL`` (set by ``bench/drain.py``), else ``REDIS_URL``.
"""

from __future__ import annotations

import os

from celery import Celery

BROKER_URL = os.environ.get("BENCH_REDIS_URL") or os.environ.get(
    "REDIS_URL", "redis://127.0.0.1:6379/14"
)

app = Celery("bench_raw", broker=BROKER_URL)
app.conf.update(
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "priority_steps": list(range(10)),
        "queue_order_strategy": "priority",
    },
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop() -> None:
    return None
