"""A user's own module, loaded with ``celery -A synth_workers worker -I tests.user_tasks``."""

from __future__ import annotations

from synth_workers import TransientError, app


@app.task(name="tests.user_tasks.greet")
def greet(name: str) -> str:
    count = int(app.redis.incr(f"test:count:greet:{name}"))
    if count == 1:
        raise TransientError("first try fails: the platform's retry policy applies")
    return f"hello {name}"
