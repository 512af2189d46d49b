"""A user's module that adds a fast periodic job to the schedule (loaded with SYNTH_INCLUDE)."""

from __future__ import annotations

from synth_workers import app

app.conf.beat_schedule = {
    **app.conf.beat_schedule,
    "test-fast": {
        "task": "tests.e2e_tasks.side_effect",
        "schedule": 1.0,
        "kwargs": {"key": "beat"},
        "options": {"priority": "high"},
    },
    # positional args, as Celery's beat entries take them
    "test-fast-args": {
        "task": "tests.e2e_tasks.flaky",
        "schedule": 1.0,
        "args": ("beat-args", 0),
    },
}
