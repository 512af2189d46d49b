"""Periodic jobs: one dict, read by the app (``celery -A synth_workers beat`` runs it).

Each entry is a Celery beat entry: ``task``, ``schedule`` (seconds, ``timedelta`` or
``celery.schedules.crontab``), and optional ``kwargs`` (the job's payload) and ``options``
(``priority``, ``queue``). Each slot is enqueued exactly once even with several beats running
(``synth_workers.ledger.scheduler``). Lease and queue health is not a periodic job: every
worker's ledger sweeper does it continuously.
"""

from __future__ import annotations

from typing import Any

from celery.schedules import crontab

beat_schedule: dict[str, dict[str, Any]] = {
    # Mail SYNTH_DLQ_DIGEST_TO what died, once a day.
    "dlq-digest": {
        "task": "tasks.system.dlq_digest",
        "schedule": crontab(hour=7, minute=0),
        "options": {"priority": "low"},
    },
    # DLQ count/age limits and finished-job retention.
    "ledger-retention": {
        "task": "tasks.system.ledger_retention",
        "schedule": crontab(minute=17),
        "options": {"priority": "low"},
    },
    # A worker of the default queue answers every minute: a cheap end-to-end liveness signal.
    "system-ping": {
        "task": "tasks.system.ping",
        "schedule": 60.0,
        "kwargs": {"message": "beat"},
        "options": {"priority": "low"},
    },
}
