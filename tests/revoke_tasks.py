"""Tasks for ``tests/test_revoke.py`` (loaded by the workers with SYNTH_INCLUDE)."""

from __future__ import annotations

import os
import signal
import time

from synth_workers import TransientError, app


@app.task(name="tests.revoke_tasks.gate")
def gate(key: str, fail: bool = False, die: bool = False) -> int:
    """Count the run, publish the process id, then wait (non-cooperatively: no cancel
    checks) until the test sets ``test:go:<key>``; then fail, kill its own process, or
    succeed with the run count."""
    client = app.redis
    count = int(client.incr(f"test:count:{key}"))
    client.set(f"test:pid:{key}", os.getpid())
    deadline = time.monotonic() + 120
    while not client.get(f"test:go:{key}") and time.monotonic() < deadline:
        time.sleep(0.02)
    if fail:
        raise TransientError("failing after a cancel, on purpose")
    if die:
        os.kill(os.getpid(), signal.SIGKILL)
    return count
