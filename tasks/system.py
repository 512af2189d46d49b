"""Platform housekeeping jobs."""

from __future__ import annotations

import socket
import time

from celery import shared_task
from pydantic import BaseModel, Field


class PingPayload(BaseModel):
    """Ask a worker to answer; ``sleep`` seconds of pretend work."""

    message: str = "ping"
    sleep: float = Field(default=0.0, ge=0.0, le=60.0)


def ping(payload: PingPayload) -> dict[str, str]:
    """Answer with the worker's host name: proves a worker of the queue is consuming."""
    if payload.sleep:
        time.sleep(payload.sleep)
    return {
        "reply": "pong" if payload.message == "ping" else payload.message,
        "host": socket.gethostname(),
    }


@shared_task(name="tasks.system.ping", payload_model=PingPayload)
def ping_task(payload: PingPayload) -> dict[str, str]:
    return ping(payload)
