"""Tasks the end-to-end tests run in real worker processes (loaded with SYNTH_INCLUDE).

They are ordinary ``@app.task`` functions of a user's own module: the platform's base Task
applies to them without asking.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel

from synth_workers import PermanentError, Task, TransientError, app


def _r() -> Any:
    return app.redis


@app.task(name="tests.e2e_tasks.record")
def record(label: str) -> str:
    """Append ``label`` to the execution-order list."""
    _r().rpush("test:order", label)
    return label


@app.task(name="tests.e2e_tasks.flaky")
def flaky(key: str, fail_times: int) -> int:
    """Fail with TransientError ``fail_times`` times, then succeed; record each attempt."""
    _r().rpush(f"test:times:{key}", repr(time.time()))
    count = int(_r().incr(f"test:count:{key}"))
    if count <= fail_times:
        raise TransientError(f"attempt {count} fails on purpose")
    return count


@app.task(name="tests.e2e_tasks.deferring", bind=True)
def deferring(self: Task, key: str, times: int, wait: float, capped: bool) -> int:
    """Defer ``times`` times (``times`` < 0: always) for ``wait`` s, then succeed; each run
    counted. ``capped``: as on a provider's 429; else as on the platform's own limit."""
    count = int(_r().incr(f"test:count:{key}"))
    if times < 0 or count <= times:
        self.defer(wait, "test_429" if capped else "own_limit", capped=capped)
    return count


@app.task(name="tests.e2e_tasks.always_failing")
def always_failing(key: str) -> None:
    _r().incr(f"test:count:{key}")
    raise ConnectionError("the upstream is down")


@app.task(name="tests.e2e_tasks.permanent")
def permanent(key: str) -> None:
    _r().incr(f"test:count:{key}")
    raise PermanentError("this can never work")


@app.task(name="tests.e2e_tasks.side_effect")
def side_effect(key: str) -> str:
    _r().incr(f"test:count:{key}")
    return key


class Order(BaseModel):
    order_id: int
    email: str


@app.task(name="tests.e2e_tasks.typed", payload_model=Order)
def typed(payload: Order) -> dict[str, Any]:
    _r().incr(f"test:count:typed:{payload.order_id}")
    return {"order_id": payload.order_id}


@app.task(name="tests.e2e_tasks.effect", bind=True)
def effect(self: Task, n: int, sleep: float = 0.0) -> int:
    """Write one effect row with the job's completion (exactly once); a second write of the
    same job is recorded as a duplicate and fails the job."""
    import psycopg

    if sleep:
        time.sleep(sleep)
    claim = self.claim
    assert claim is not None
    try:
        with self.effect_transaction() as conn:
            conn.execute(
                "INSERT INTO test_effects (job_id, n, owner) VALUES (%s, %s, %s)",
                (claim.job_id, n, claim.owner),
            )
    except psycopg.errors.UniqueViolation:
        with app.ledger.connection() as conn:
            conn.execute("INSERT INTO test_duplicates (job_id) VALUES (%s)", (claim.job_id,))
        raise PermanentError(f"duplicate effect for job {claim.job_id}") from None
    return n


@app.task(name="tests.e2e_tasks.suicide")
def suicide(key: str) -> None:
    """Kill the process running it: a poison pill."""
    import os
    import signal

    _r().incr(f"test:count:{key}")
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(name="tests.e2e_tasks.guarded", bind=True)
def guarded(self: Task, key: str) -> int:
    """An outside effect guarded against a second run; the first run then fails."""
    if not self.effect_done("sent"):
        _r().incr(f"test:count:{key}")
        self.record_effect("sent", {"key": key})
    attempt = self.claim.attempt if self.claim else 0
    if attempt == 1:
        raise TransientError("fail after the effect, so the job runs again")
    return attempt


@app.task(name="tests.e2e_tasks.fails_while_flagged")
def fails_while_flagged(key: str) -> str:
    _r().incr(f"test:count:{key}")
    if _r().get(f"test:flag:{key}"):
        raise PermanentError("flag is set")
    return "ok"


@app.task(name="tests.e2e_tasks.long_running", bind=True)
def long_running(self: Task, key: str, seconds: float) -> str:
    """Runs until done or cancelled, checking cooperatively."""
    deadline = time.monotonic() + seconds
    _r().set(f"test:started:{key}", 1)
    while time.monotonic() < deadline:
        self.raise_if_cancelled()
        time.sleep(0.05)
    return "finished"


@app.task(name="tests.e2e_tasks.slow_soft", soft_time_limit=0.5, max_attempts=1)
def slow_soft() -> None:
    time.sleep(5)


@app.task(name="tests.e2e_tasks.slow_hard", time_limit=1, max_attempts=1)
def slow_hard() -> None:
    time.sleep(10)
