"""arq for the peers benchmark: one worker process (asyncio, ``max_jobs`` 10), its defaults
(results kept 3600 s) with the default poll (0.5 s) or a 10 ms poll.
Redis: ``BENCH_PEERS_REDIS_URL``. Worker: ``arq bench.peers.arq_app.WorkerSettings``."""

from __future__ import annotations

import time
from typing import Any, ClassVar

from arq.connections import RedisSettings

from bench.peers.probe import redis_url


async def noop(ctx: dict[str, Any]) -> None:
    return None


async def probe(ctx: dict[str, Any], key: str) -> None:
    started = time.time()
    await ctx["redis"].rpush(key, repr(started))


def settings() -> RedisSettings:
    return RedisSettings.from_dsn(redis_url())


class WorkerSettings:
    """arq's default poll (``poll_delay`` 0.5 s)."""

    functions: ClassVar[list[Any]] = [noop, probe]
    redis_settings = settings()


class WorkerSettings10ms:
    """The same with a 10 ms poll (arq reads a settings class's own attributes only)."""

    functions: ClassVar[list[Any]] = [noop, probe]
    redis_settings = settings()
    poll_delay = 0.01
