"""Periodic jobs: one dict, read by the app (``celery -A synth_workers beat`` runs it).

Each entry is a Celery beat entry: ``task``, ``schedule`` (seconds, ``timedelta`` or
``celery.schedules.crontab``), and optional ``kwargs`` (the job's payload) and ``options``
(``priority``, ``queue``).
"""

from __future__ import annotations

from typing import Any

beat_schedule: dict[str, dict[str, Any]] = {
    # A worker of the default queue answers every minute: a cheap end-to-end liveness signal.
    "system-ping": {
        "task": "tasks.system.ping",
        "schedule": 60.0,
        "kwargs": {"message": "beat"},
        "options": {"priority": "low"},
    },
}
