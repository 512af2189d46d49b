"""The latency probe every peer's task calls first: it records when the job started.

``record_start(key)`` appends ``time.time()`` to the Redis list ``key`` on the peer's own
Redis database (``BENCH_PEERS_REDIS_URL``). The client that enqueued the job took its own
``time.time()`` just before the enqueue call and pops this value (``BLPOP``): the difference is
enqueue -> task start. Both read the same system clock (one machine). The timestamp is taken
before the push, so the push's round trip is not in the figure.
"""

from __future__ import annotations

import os
import time
from typing import Any

_client: Any = None
_pid = 0


def redis_url() -> str:
    return os.environ.get("BENCH_PEERS_REDIS_URL", "redis://127.0.0.1:6379/0")


def record_start(key: str) -> None:
    started = time.time()
    global _client, _pid
    if _client is None or _pid != os.getpid():  # one client per (forked) process
        import redis

        _client = redis.Redis.from_url(redis_url())
        _pid = os.getpid()
    _client.rpush(key, repr(started))
