"""Tasks for the result-backend tests (``tests/test_results.py``), run by real workers with
``SYNTH_INCLUDE=tests.e2e_tasks,tests.result_tasks``; all on queue ``results``."""

from __future__ import annotations

from typing import Any

from celery.exceptions import Reject
from pydantic import BaseModel

from synth_workers import PermanentError, app

QUEUE = "results"


class ResultError(PermanentError):
    """A user's own exception (module ``tests.result_tasks``): dead at once."""


def _r() -> Any:
    return app.redis


@app.task(name="tests.result_tasks.held", queue=QUEUE)
def held(key: str, value: Any) -> Any:
    """Say it started, then wait (up to 30 s) until the test releases ``key``."""
    _r().rpush(f"test:started:{key}", "1")
    _r().blpop([f"test:release:{key}"], timeout=30)
    return value


@app.task(name="tests.result_tasks.fails", queue=QUEUE)
def fails(message: str, code: int) -> None:
    raise ResultError(message, code)


@app.task(name="tests.result_tasks.value_error", queue=QUEUE, max_attempts=1)
def value_error(message: str) -> None:
    raise ValueError(message)


@app.task(name="tests.result_tasks.square", queue=QUEUE)
def square(x: int) -> int:
    return x * x


@app.task(name="tests.result_tasks.part", queue=QUEUE)
def part(key: str, i: int) -> int:
    """A chord header part; each run counted. Part 0's first run waits for the test (which
    SIGKILLs the process running it); every other run returns at once."""
    runs = int(_r().incr(f"test:runs:{key}:{i}"))
    if i == 0 and runs == 1:
        _r().rpush(f"test:started:{key}", str(__import__("os").getpid()))
        _r().blpop([f"test:release:{key}"], timeout=60)
    return i * 10


@app.task(name="tests.result_tasks.total", queue=QUEUE)
def total(values: list[int], key: str) -> int:
    """A chord callback: counts its runs and what it was given."""
    _r().rpush(f"test:callback:{key}", repr(values))
    return sum(values)


@app.task(name="tests.result_tasks.add_not_typed", queue=QUEUE, typing=False)
def add_not_typed(x: int, y: int) -> int:
    """Celery's ``typing=False``: arguments are not checked when sent, the call fails."""
    return x + y


class Pair(BaseModel):
    x: int
    y: int


@app.task(name="tests.result_tasks.add_pair", queue=QUEUE, pydantic=True)
def add_pair(pair: Pair) -> dict[str, int]:
    """Celery's ``pydantic=True``: the caller passes a model, the task gets one back."""
    return {"sum": pair.x + pair.y}


@app.task(name="tests.result_tasks.square_ignored", queue=QUEUE, ignore_result=True)
def square_ignored(x: int) -> int:
    return x * x


@app.task(name="tests.result_tasks.retry_later", queue=QUEUE, bind=True, max_retries=1)
def retry_later(self: Any, message: str) -> None:
    """Retry in a minute with the user's own exception: RETRY meanwhile."""
    raise self.retry(exc=ResultError(message, 7), countdown=60)


@app.task(name="tests.result_tasks.reject_then_succeed", queue=QUEUE, bind=True)
def reject_then_succeed(self: Any) -> str:
    """Celery's Reject(requeue=True) on the first delivery; the redelivery succeeds."""
    if not (self.request.delivery_info or {}).get("redelivered"):
        raise Reject(requeue=True)
    return "second-pass"


@app.task(name="tests.result_tasks.reject_for_good", queue=QUEUE)
def reject_for_good() -> None:
    raise Reject("not for us", requeue=False)
