"""A user's own plain Celery app, adopted by ``synth_workers.install`` (test_install.py).

``celery -A tests.plain_app worker`` runs it: nothing here is platform code but the one
``install(app)`` line.
"""

from __future__ import annotations

import os

from celery import Celery

import synth_workers

app = Celery("plain", broker=os.environ["REDIS_URL"])
synth_workers.install(app)


@app.task(name="tests.plain_app.double")
def double(x: int) -> int:
    return 2 * x
