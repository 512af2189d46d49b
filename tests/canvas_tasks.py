"""Tasks for the canvas, Celery-retry and priority tests (loaded with SYNTH_INCLUDE).

Each records what it saw in Redis (``test:*`` keys) so that the tests can assert on runs,
``request.retries``, times and ``delivery_info`` from outside the worker. Tests send them
to :data:`QUEUE` (:func:`sig`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from celery.canvas import Signature

from synth_workers import Task, app

QUEUE = "canvas-test"


def sig(task: Any, *args: Any, **kwargs: Any) -> Signature[Any]:
    """``task.s(*args, **kwargs)`` routed to :data:`QUEUE`."""
    return task.s(*args, **kwargs).set(queue=QUEUE)  # type: ignore[no-any-return]


def _r() -> Any:
    return app.redis


def _seen(self: Task, key: str) -> int:
    """Count this run of ``key`` and record its ``request.retries`` and time."""
    _r().rpush(f"test:retries:{key}", int(self.request.retries or 0))
    _r().rpush(f"test:times:{key}", repr(time.time()))
    return int(_r().incr(f"test:count:{key}"))


@app.task(name="tests.canvas_tasks.add")
def add(x: int, y: int) -> int:
    return x + y


@app.task(name="tests.canvas_tasks.collect")
def collect(value: Any, key: str) -> Any:
    """The last step of a chain: record the value it was handed."""
    _r().rpush(f"test:collect:{key}", json.dumps(value))
    return value


@app.task(name="tests.canvas_tasks.on_error")
def on_error(task_id: str) -> None:
    """A ``link_error`` callback: record the id of the job that failed."""
    _r().rpush("test:errback", task_id)


@app.task(name="tests.canvas_tasks.retry_once", bind=True, max_retries=3)
def retry_once(self: Task, key: str) -> int:
    """``self.retry()`` on the first run, then succeed with the run count."""
    count = _seen(self, key)
    if count == 1:
        raise self.retry(countdown=0.2)
    return count


@app.task(name="tests.canvas_tasks.retry_until", bind=True, max_retries=None)
def retry_until(self: Task, key: str, runs: int) -> int:
    """Retry (``max_retries=None``: no limit) until run ``runs``, which succeeds."""
    count = _seen(self, key)
    if count < runs:
        raise self.retry(countdown=0)
    return count


@app.task(name="tests.canvas_tasks.retry_no_exc", bind=True, max_retries=1)
def retry_no_exc(self: Task, key: str) -> None:
    """Always ``self.retry()`` without ``exc``: ends in MaxRetriesExceededError."""
    _seen(self, key)
    raise self.retry(countdown=0)


@app.task(
    name="tests.canvas_tasks.auto_max1",
    bind=True,
    autoretry_for=(ValueError,),
    max_retries=1,
    default_retry_delay=0,
)
def auto_max1(self: Task, key: str) -> None:
    _seen(self, key)
    raise ValueError("always fails")


@app.task(
    name="tests.canvas_tasks.auto_max5",
    bind=True,
    autoretry_for=(ValueError,),
    max_retries=5,
    default_retry_delay=0,
)
def auto_max5(self: Task, key: str) -> None:
    _seen(self, key)
    raise ValueError("always fails")


@app.task(
    name="tests.canvas_tasks.auto_skip",
    bind=True,
    autoretry_for=(Exception,),
    dont_autoretry_for=(KeyError,),
    max_retries=5,
    default_retry_delay=0,
)
def auto_skip(self: Task, key: str) -> None:
    """``dont_autoretry_for`` wins over ``autoretry_for``: one run."""
    _seen(self, key)
    raise KeyError("never retried")


@app.task(
    name="tests.canvas_tasks.backoff2",
    bind=True,
    autoretry_for=(ValueError,),
    max_retries=2,
    retry_backoff=2,
    retry_jitter=False,
)
def backoff2(self: Task, key: str) -> None:
    _seen(self, key)
    raise ValueError("always fails")


@app.task(name="tests.canvas_tasks.retry_then_hang", bind=True, max_retries=3)
def retry_then_hang(self: Task, key: str) -> int:
    """Run 1 retries; run 2 hangs (its worker is killed); run 3 succeeds."""
    count = _seen(self, key)
    if count == 1:
        raise self.retry(countdown=0)
    if count == 2:
        time.sleep(120)
    return count


@app.task(name="tests.canvas_tasks.prio_probe", bind=True)
def prio_probe(self: Task, key: str) -> None:
    """Record the priority the task sees in ``delivery_info``."""
    _r().rpush(f"test:prio:{key}", json.dumps((self.request.delivery_info or {}).get("priority")))


@app.task(name="tests.canvas_tasks.replaced", bind=True)
def replaced(self: Task, key: str, x: int) -> Any:
    """Celery's ``self.replace``: run 1 replaces itself by ``add(x, 1) | add(10)``; the
    replacement's last step inherits this job's id, so the caller's result is its value."""
    _seen(self, key)
    return self.replace(sig(add, x, 1) | sig(add, 10))


@app.task(name="tests.canvas_tasks.returns_a_result", bind=True)
def returns_a_result(self: Task) -> Any:
    """Return an ``AsyncResult`` (of a chain it starts): Celery stores its tuple form."""
    return (sig(add, 1, 1) | sig(add, 2)).apply_async()


@app.task(name="tests.canvas_tasks.fails")
def fails(*args: Any) -> None:
    raise ValueError("expected to fail", *args)


@app.task(name="tests.canvas_tasks.tsum")
def tsum(values: list[int]) -> int:
    return sum(values)


@app.task(name="tests.canvas_tasks.retry_new_args", bind=True, max_retries=1)
def retry_new_args(self: Task, foo: int, bar: int, label: str | None = None) -> dict[str, Any]:
    """Celery's ``self.retry(args=...)`` on a job sent with keywords: the next run gets the
    new positional arguments and keeps the keyword that does not conflict."""
    if not self.request.retries:
        raise self.retry(args=(foo + 1, bar + 1), countdown=0)
    return {"foo": foo, "bar": bar, "label": label, "retries": self.request.retries}


@app.task(name="tests.canvas_tasks.retry_new_kwargs", bind=True, max_retries=1)
def retry_new_kwargs(self: Task, foo: int, bar: int) -> dict[str, Any]:
    """``self.retry(kwargs=...)`` on a job sent with positional arguments."""
    if not self.request.retries:
        raise self.retry(kwargs={"foo": foo + 1}, countdown=0)
    return {"foo": foo, "bar": bar, "retries": self.request.retries}


@app.task(name="tests.canvas_tasks.retry_expiring", bind=True, max_retries=3)
def retry_expiring(self: Task, key: str) -> int:
    """``self.retry(expires=1)`` with a 3-s countdown: expired before its next run."""
    count = _seen(self, key)
    if count == 1:
        raise self.retry(countdown=3, expires=1)
    return count


@app.task(name="tests.canvas_tasks.hangs_once", bind=True, time_limit=2, max_attempts=2)
def hangs_once(self: Task, key: str) -> int:
    """Run 1 outlives its hard time limit (its process is killed); run 2 succeeds."""
    count = _seen(self, key)
    if count == 1:
        time.sleep(30)
    return count


@app.task(name="tests.canvas_tasks.request_eta", bind=True)
def request_eta(self: Task) -> Any:
    """The ``request.eta`` a delayed job runs with (Celery's: when it was due)."""
    return self.request.eta


@app.task(name="tests.canvas_tasks.kinds", bind=True, max_retries=1)
def kinds(self: Task, *args: Any, again: bool = False, **kwargs: Any) -> list[str]:
    """The types its arguments arrived as (after one retry when ``again``)."""
    if again and not self.request.retries:
        raise self.retry(countdown=0)
    return [type(a).__name__ for a in args] + sorted(
        f"{k}:{type(v).__name__}" for k, v in kwargs.items()
    )


class CustomError(Exception):
    """An exception class of this module (not a builtin)."""


@app.task(name="tests.canvas_tasks.retry_custom", bind=True, max_retries=1, default_retry_delay=0)
def retry_custom(self: Task) -> None:
    raise self.retry(exc=CustomError("custom"))
