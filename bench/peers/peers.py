"""The peers: how each one's workers start, how much of its backlog is left, what it ran.

Every peer has a Redis database of its own on the benchmark's private server (``db``), so no
scan or flush touches another's keys. Fair settings (printed and stored with the results):
two worker processes where the library has processes, each library's defaults otherwise.
"""

from __future__ import annotations

import shlex
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis

from bench.peers.client import (
    CELERY_OVERLAP_QUEUE,
    CELERY_QUEUE,
    CELERY_ROUNDTRIP_QUEUE,
    PLATFORM_QUEUE,
    QUEUE,
)

BIN = Path(sys.executable).parent
PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: queue + SEP + step, steps 1..9
LEDGER_SCHEMA = "synth_bench_peers"
DEFAULT_PLATFORM_WORKER_ARGS = "-P prefork -c 2"
CELERY_DB = 0  # plain Celery's Redis database on the private server
CELERY_ROUNDTRIP_DB = 8  # peer celery-roundtrip's
CELERY_OVERLAP_DB = 9  # peer celery-overlap's


def kombu_lists(queue: str) -> list[str]:
    return [queue] + [f"{queue}{PRIORITY_SEP}{step}" for step in range(1, 10)]


@dataclass
class Context:
    """What the commands and checks need from the run: URLs, ports, the ledger probe."""

    redis_base: str  # redis://127.0.0.1:PORT (no database)
    database_url: str
    platform_worker_args: str = DEFAULT_PLATFORM_WORKER_ARGS
    platform_env: dict[str, str] = field(default_factory=dict)
    metrics_port: int = 0
    ledger: Any = None  # bench.peers.harness.Ledger, once connected

    def url(self, db: int) -> str:
        return f"{self.redis_base}/{db}"


@dataclass(frozen=True)
class Peer:
    name: str
    db: int
    settings: str  # the fair settings, in words
    commands: Callable[[Peer, Context, str], list[list[str]]]  # (peer, ctx, node tag)
    pending: Callable[[redis.Redis, Context], int]  # jobs not yet finished
    # after a drain of n by the workers started with node tag NODE: (jobs the peer says it
    # ran, or None where it keeps no count; problems found)
    verify: Callable[[redis.Redis, Context, int, str], tuple[int | None, list[str]]]
    bulk: str = "none"  # the bulk enqueue used, in words
    extra_env: tuple[tuple[str, str], ...] = ()  # a platform variant's own settings
    database: bool = False  # its workers write to Postgres (DATABASE_URL)

    @property
    def is_platform(self) -> bool:
        """The platform or one of its ``--platform-variant`` peers."""
        return self.name.split("-", maxsplit=1)[0] == "platform"

    def env(self, ctx: Context) -> dict[str, str]:
        """Variables for this peer's workers and client, on top of the harness's own."""
        url = ctx.url(self.db)
        env = {"BENCH_PEERS_REDIS_URL": url, "BENCH_REDIS_URL": url}
        if self.database:
            env["DATABASE_URL"] = ctx.database_url
        if self.is_platform:
            env.update(
                REDIS_URL=url,
                DATABASE_URL=ctx.database_url,
                SYNTH_DB_SCHEMA=LEDGER_SCHEMA,
                SYNTH_INCLUDE="bench.peers.platform_tasks",
                SYNTH_METRICS_PORT=str(ctx.metrics_port),
            )
            env.update(ctx.platform_env)
            env.update(dict(self.extra_env))
        return env


def platform_variant(label: str, settings: dict[str, str], index: int) -> Peer:
    """The platform again as peer ``platform-LABEL`` with extra settings (e.g. another
    consumption mode), on a Redis database of its own, measured in the same rounds."""
    base = BY_NAME["platform"]
    words = ", ".join(f"{k}={v}" for k, v in settings.items())
    return replace(
        base,
        name=f"platform-{label}",
        db=len(PEERS) + index,
        settings=f"as platform, with {words}",
        extra_env=tuple(settings.items()),
    )


def _celery_worker(module: str, queue: str, extra: list[str], node: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        module,
        "worker",
        "-Q",
        queue,
        "-n",
        f"{node}@{socket.gethostname()}",
        "--without-mingle",
        "--without-gossip",
        "-l",
        "WARNING",
        *extra,
    ]


def _lists_pending(client: redis.Redis, queue: str) -> int:
    pipe = client.pipeline(transaction=False)
    for key in kombu_lists(queue):
        pipe.llen(key)
    pipe.hlen("unacked")
    return sum(int(n) for n in pipe.execute())


def _celery_verify(
    db: int, queue: str, task: str
) -> Callable[[redis.Redis, Context, int, str], tuple[int | None, list[str]]]:
    """The worker's own count of runs of ``task`` (``inspect stats``), and nothing left
    unacked (acks late: a message leaves kombu's unacked hash only when its job has
    returned)."""

    def verify(
        client: redis.Redis, ctx: Context, n: int, node: str
    ) -> tuple[int | None, list[str]]:
        from celery import Celery

        control = Celery("bench-peers-control", broker=ctx.url(db))
        name = f"{node}@{socket.gethostname()}"
        try:
            replies = control.control.inspect(destination=[name], timeout=5.0, limit=1).stats()
        finally:
            control.close()
        stats = (replies or {}).get(name)
        left = _lists_pending(client, queue)
        problems = [f"{left} messages left"] if left else []
        if not stats:
            return None, [*problems, "the worker did not answer `inspect stats`"]
        ran = int(stats.get("total", {}).get(task, 0))
        return ran, problems if ran == n else [*problems, f"the worker ran {ran} of {n} jobs"]

    return verify


def _platform_pending(client: redis.Redis, ctx: Context) -> int:
    waiting = _lists_pending(client, PLATFORM_QUEUE)
    if waiting:
        return waiting
    return int(ctx.ledger.unfinished())


def _platform_verify(
    client: redis.Redis, ctx: Context, n: int, node: str
) -> tuple[int | None, list[str]]:
    states = ctx.ledger.states()
    done = states.get("succeeded", 0)
    return done, [] if done == n and sum(states.values()) == n else [f"ledger states {states}"]


def _huey_verify(
    client: redis.Redis, ctx: Context, n: int, node: str
) -> tuple[int | None, list[str]]:
    # Huey pops a message and keeps no record of a no-op that returned None: the queue's
    # emptiness and the consumer's log (no errors) are the checks.
    left = int(client.llen("huey.redis.bench_peers"))
    return None, [] if not left else [f"{left} messages left"]


def _dramatiq_verify(
    client: redis.Redis, ctx: Context, n: int, node: str
) -> tuple[int | None, list[str]]:
    # a message leaves ``.msgs`` when acked (its actor returned); failures go to ``.XQ``
    left = int(client.hlen(f"dramatiq:{QUEUE}.msgs"))
    dead = int(client.zcard(f"dramatiq:{QUEUE}.XQ"))
    problems = [f"{left} messages left"] if left else []
    problems += [f"{dead} dead-lettered"] if dead else []
    return n - left - dead, problems


def _rq_pending(client: redis.Redis, ctx: Context) -> int:
    pipe = client.pipeline(transaction=False)
    pipe.llen(f"rq:queue:{QUEUE}")
    pipe.llen(f"rq:queue:{QUEUE}:intermediate")
    pipe.zcard(f"rq:wip:{QUEUE}")
    return sum(int(x) for x in pipe.execute())


def _rq_verify(
    client: redis.Redis, ctx: Context, n: int, node: str
) -> tuple[int | None, list[str]]:
    done = int(client.zcard(f"rq:finished:{QUEUE}"))  # kept result_ttl (500 s, RQ's default)
    failed = int(client.zcard(f"rq:failed:{QUEUE}"))
    return done, [] if done == n and not failed else [f"{done} finished, {failed} failed"]


def _arq_verify(
    client: redis.Redis, ctx: Context, n: int, node: str
) -> tuple[int | None, list[str]]:
    done = sum(1 for _ in client.scan_iter(match="arq:result:*", count=1000))  # kept 3600 s
    return done, [] if done == n else [f"{done} results for {n} jobs"]


def _rq_commands(peer: Peer, ctx: Context, node: str) -> list[list[str]]:
    return [
        [str(BIN / "rq"), "worker", "-u", ctx.url(peer.db), "--quiet", "-n", f"{node}-{i}", QUEUE]
        for i in range(2)
    ]


def _dramatiq(processes: int) -> Callable[[Peer, Context, str], list[list[str]]]:
    def commands(peer: Peer, ctx: Context, node: str) -> list[list[str]]:
        return [
            [
                str(BIN / "dramatiq"),
                "bench.peers.dramatiq_app",
                "-p",
                str(processes),
                "-t",
                "8",
                "-Q",
                QUEUE,
            ],
        ]

    return commands


def _arq(settings: str) -> Callable[[Peer, Context, str], list[list[str]]]:
    def commands(peer: Peer, ctx: Context, node: str) -> list[list[str]]:
        return [[str(BIN / "arq"), f"bench.peers.arq_app.{settings}"]]

    return commands


def _llen(key: str) -> Callable[[redis.Redis, Context], int]:
    return lambda client, ctx: int(client.llen(key))


def _dramatiq_pending(client: redis.Redis, ctx: Context) -> int:
    return int(client.hlen(f"dramatiq:{QUEUE}.msgs"))


def _celery_peer(
    name: str, db: int, about: str, module: str, queue: str, task: str, database: bool = False
) -> Peer:
    """A plain Celery peer: one ``celery -A module worker -P prefork -c 2`` on ``queue``, its
    backlog kombu's lists, its runs of ``task`` counted by the worker."""
    return Peer(
        name,
        db,
        about,
        lambda p, ctx, node: [_celery_worker(module, queue, ["-P", "prefork", "-c", "2"], node)],
        lambda client, ctx: _lists_pending(client, queue),
        _celery_verify(db, queue, task),
        database=database,
    )


PEERS: tuple[Peer, ...] = (
    _celery_peer(
        "celery",
        CELERY_DB,
        "1 worker, prefork -c 2, prefetch 1, acks late, no result backend (bench/raw_app.py)",
        "bench.peers.celery_app",
        CELERY_QUEUE,
        "bench.noop",
    ),
    Peer(
        "platform",
        1,
        "1 worker, `celery -A synth_workers worker` + --platform-worker-args, events and "
        "metrics on (as shipped), ledger in Postgres",
        lambda p, ctx, node: [
            _celery_worker(
                "synth_workers", PLATFORM_QUEUE, shlex.split(ctx.platform_worker_args), node
            )
        ],
        _platform_pending,
        _platform_verify,
        bulk="--platform-bulk (synth_workers.enqueue_many)",
    ),
    Peer(
        "huey",
        2,
        "huey_consumer -w 2 -k process (2 processes), RedisHuey defaults",
        lambda p, ctx, node: [
            [
                str(BIN / "huey_consumer"),
                "bench.peers.huey_app.huey",
                "-w",
                "2",
                "-k",
                "process",
                "-q",
            ]
        ],
        _llen("huey.redis.bench_peers"),
        _huey_verify,
    ),
    Peer(
        "dramatiq",
        3,
        "1 process x 8 threads, RedisBroker, default middleware",
        _dramatiq(1),
        _dramatiq_pending,
        _dramatiq_verify,
    ),
    Peer(
        "dramatiq-2p",
        4,
        "2 processes x 8 threads, RedisBroker, default middleware",
        _dramatiq(2),
        _dramatiq_pending,
        _dramatiq_verify,
    ),
    Peer(
        "rq",
        5,
        "2 `rq worker` processes (default Worker: a fork per job), results kept 500 s",
        _rq_commands,
        _rq_pending,
        _rq_verify,
        bulk="Queue.enqueue_many",
    ),
    Peer(
        "arq",
        6,
        "1 process (asyncio, max_jobs 10), default poll 0.5 s, results kept 3600 s",
        _arq("WorkerSettings"),
        lambda client, ctx: int(client.zcard("arq:queue")),
        _arq_verify,
    ),
    Peer(
        "arq-10ms",
        7,
        "as arq with poll_delay 0.01 s",
        _arq("WorkerSettings10ms"),
        lambda client, ctx: int(client.zcard("arq:queue")),
        _arq_verify,
    ),
    _celery_peer(
        "celery-roundtrip",
        CELERY_ROUNDTRIP_DB,
        "as celery, each task first writing one row to Postgres, waited for (asynchronous "
        "commit, as a platform worker's claim): the floor of claiming each job in the pool "
        "process before it runs",
        "bench.peers.celery_app",
        CELERY_ROUNDTRIP_QUEUE,
        "bench.noop_roundtrip",
        database=True,
    ),
    _celery_peer(
        "celery-overlap",
        CELERY_OVERLAP_DB,
        "as celery-roundtrip, the write sent by the worker's main process as the message "
        "arrives, its answer relayed to the pool process (bench/overlap_app.py): the floor "
        "of a claim that overlaps Celery's hand-over to the pool",
        "bench.peers.celery_overlap_app",
        CELERY_OVERLAP_QUEUE,
        "bench.noop_overlap",
        database=True,
    ),
)

BY_NAME = {peer.name: peer for peer in PEERS}
