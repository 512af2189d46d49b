"""Loaded into test workers (SYNTH_INCLUDE): copies ``workflow_completed`` and ``usage``
lifecycle announcements into a Redis list the tests read."""

from __future__ import annotations

import json

from synth_workers import app
from synth_workers.lifecycle import JobEvent

EVENTS_KEY = "test:llm-events"


def _record(event: JobEvent) -> None:
    if event.kind in ("workflow_completed", "usage"):
        app.redis.rpush(
            EVENTS_KEY,
            json.dumps(
                {
                    "kind": event.kind,
                    "job_id": event.job_id,
                    "task": event.task,
                    "user_id": event.user_id,
                    "data": dict(event.data),
                }
            ),
        )


app.lifecycle.connect(_record)
