"""Tasks the end-to-end tests run in real worker processes (loaded with SYNTH_INCLUDE).

They are ordinary ``@app.task`` functions of a user's own module: the platform's base Task
applies to them without asking.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel

from synth_workers import PermanentError, TransientError, app


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
