"""Tasks the events tests run in real worker processes (SYNTH_INCLUDE adds this module)."""

from __future__ import annotations

import time

from synth_workers import Task, app


@app.task(name="tests.events_tasks.steps", bind=True)
def steps(self: Task, n: int = 10, sleep: float = 0.0) -> int:
    """Report ``n`` progress steps, ``sleep`` seconds apart."""
    for i in range(1, n + 1):
        self.progress(i, n, message=f"step {i}")
        if sleep:
            time.sleep(sleep)
    return n


@app.task(name="tests.events_tasks.workflow", bind=True)
def workflow(self: Task) -> str:
    self.progress(1, 1)
    self.workflow_completed(outputs=1)
    return "done"


@app.task(name="tests.events_tasks.gated", bind=True)
def gated(self: Task, n: int, pauses: list[int], gate: str) -> int:
    """Report ``n`` progress steps; after each step in ``pauses``, wait until the test pushes
    to the Redis list ``gate`` (a test decides what happens between steps, no timing)."""
    import redis

    client = redis.Redis.from_url(app.settings.broker_url)
    try:
        for i in range(1, n + 1):
            self.progress(i, n, message=f"step {i}")
            if i in pauses and client.blpop([gate], timeout=120) is None:
                raise RuntimeError(f"gate {gate} was not opened after step {i}")
    finally:
        client.close()
    return n
