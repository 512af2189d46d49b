"""Platform housekeeping jobs: ping, ledger retention, the daily dead-letter digest."""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime
from typing import Any

from celery import shared_task
from pydantic import BaseModel, Field

from synth_workers.deadletter import DeadLetterQueue
from synth_workers.producer import enqueue
from synth_workers.task import Task


class PingPayload(BaseModel):
    """Ask a worker to answer; ``sleep`` seconds of pretend work."""

    message: str = "ping"
    sleep: float = Field(default=0.0, ge=0.0, le=60.0)


def ping(payload: PingPayload) -> dict[str, str]:
    """Answer with the worker's host name: proves a worker of the queue is consuming."""
    if payload.sleep:
        time.sleep(payload.sleep)
    reply = "pong" if payload.message == "ping" else payload.message
    return {"reply": reply, "host": socket.gethostname()}


@shared_task(name="tasks.system.ping", payload_model=PingPayload)
def ping_task(payload: PingPayload) -> dict[str, str]:
    return ping(payload)


@shared_task(name="tasks.system.ledger_retention", bind=True)
def ledger_retention(self: Task) -> dict[str, int]:
    """Apply the DLQ's count and age limits and drop finished jobs past SYNTH_JOB_TTL."""
    return DeadLetterQueue(self.synth_app).apply_retention()


@shared_task(name="tasks.system.dlq_digest", bind=True)
def dlq_digest(self: Task) -> dict[str, Any]:
    """Mail SYNTH_DLQ_DIGEST_TO a table of dead jobs per task and failure class (once a day)."""
    app = self.synth_app
    rows = DeadLetterQueue(app).summary()
    recipients = app.settings.dlq_digest_to
    total = sum(int(r["count"]) for r in rows)
    if not recipients or not total:
        return {"dead": total, "sent": False}
    day = datetime.now(UTC).date().isoformat()
    context = {
        "day": day,
        "total": total,
        "rows": [{**r, "last": r["last"].isoformat() if r["last"] else ""} for r in rows],
    }
    handle = enqueue(
        "tasks.email.send_email",
        {"to": recipients, "template": "dlq_digest", "context": context},
        priority="low",
        idempotency_key=f"dlq-digest:{day}",
        app=app,
    )
    return {"dead": total, "sent": True, "email_job": handle.id}
