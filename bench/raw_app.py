"""A plain Celery app: the baseline the platform is compared with in ``bench/drain.py``.

Configured like the platform where it matters for throughput (same broker, JSON, late acks,
prefetch 1, no results, ten priority lists polled most-urgent-first), and nothing more.
The broker is ``BENCH_REDIS_URL`` (set by ``bench/drain.py``), else ``REDIS_URL``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

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


# --- one Postgres round trip per job (bench/drain.py --roundtrip, peer celery-roundtrip) -----
#: Each worker process's row: one per process, so the two never wait for each other's lock.
ROUNDTRIP_TABLE = "public.synth_bench_roundtrip"
ROUNDTRIP_CREATE = f"CREATE TABLE IF NOT EXISTS {ROUNDTRIP_TABLE} (pid int PRIMARY KEY, n bigint)"
ROUNDTRIP_WRITE = (
    f"INSERT INTO {ROUNDTRIP_TABLE} VALUES (%s, 1) "  # noqa: S608 - a constant
    "ON CONFLICT (pid) DO UPDATE SET n = synth_bench_roundtrip.n + 1"
)
_conn: dict[int, Any] = {}


def _process_connection() -> Any:
    """This process's connection, as a platform worker's: autocommit, asynchronous commits
    (``DATABASE_URL``)."""
    pid = os.getpid()
    conn = _conn.get(pid)
    if conn is None:
        import psycopg

        url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
        conn = psycopg.connect(url, autocommit=True, options="-c synchronous_commit=off")
        # the other process may create it at the same time
        with contextlib.suppress(psycopg.errors.UniqueViolation):
            conn.execute(ROUNDTRIP_CREATE)
        _conn.clear()
        _conn[pid] = conn
    return conn


def roundtrip() -> None:
    """What no design that claims each job in Postgres before running it can leave out: one
    write, waited for, before the body. Nothing else of the platform's."""
    _process_connection().execute(ROUNDTRIP_WRITE, (os.getpid(),))


@app.task(name="bench.noop_roundtrip")
def noop_roundtrip() -> None:
    """Plain Celery's no-op after :func:`roundtrip`."""
    roundtrip()
