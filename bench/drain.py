"""Backlog-drain benchmark: how fast one worker empties a queue of no-op jobs.

Three apps on the same Redis, in the same run, each round rotating the order:

* ``raw``: a plain Celery app (``bench/raw_app.py``), task ``bench.noop``; records nothing;
* ``raw-tracked``: the same app with Celery's Redis result backend and ``task_track_started``
  (``bench/raw_tracked_app.py``), task ``bench.noop_tracked``: STARTED and SUCCESS per job;
* ``platform``: ``synth_workers`` (ledger row per job, claim + fenced finish per run),
  task ``bench.platform_noop`` (``bench/platform_tasks.py``, loaded by ``SYNTH_INCLUDE``).

``raw-tracked`` is the like-for-like baseline (both it and the platform record every job's
state); ``raw`` shows what bare Celery does when nothing is recorded.

Per app and round: clean the queue, enqueue N jobs with no worker running (not timed),
measure the worker's start-up on an empty queue (process start until it answers a ping),
then start the same worker command on the backlog and time from process start until the
queue's ten priority lists are empty and kombu's ``unacked`` hash is empty (late acks:
every job finished). ``net = drain - startup``; ``jobs/s = N / net``. The same drain run also
records when the backlog first shrank (the worker took its first message): ``consume = drain -
first take`` and ``N / consume`` is the steadier figure (a worker on an empty queue answers its
first ping only after its first 1-s BRPOP returns, which inflates ``startup``).

Run from the repository root::

    .venv/bin/python -m bench.drain --jobs 2000 --rounds 3
    .venv/bin/python -m bench.drain --jobs 2000 --rounds 6 --baseline 6666a79

``--baseline REF`` adds a fourth app, ``platform@REF``: the platform as it was at git revision
REF (e.g. ``--baseline 6666a79``, main before a change), measured in the same rounds as the
others, so a change's cost is read in one run on one machine. Rounds then go in pairs: the
second round of a pair has the same rotation with the two platform apps swapped (a drain right
after a platform drain can read up to 25 % slower; use an even ``--rounds``):

* its code comes from a checkout of REF (``git worktree add --detach``, in a temporary folder
  removed at exit); its worker and every process that touches its ledger (the ``db migrate``,
  the enqueue of its backlog: the row format differs between versions) run with that tree as
  their working directory and first on ``PYTHONPATH``, so they import REF's ``synth_workers``
  and REF's ``bench/platform_tasks.py``. A probe in that environment checks where both were
  imported from and the benchmark stops (exit 2) when it is not that tree;
* its ledger is its own Postgres schema (``synth_bench_baseline``) and its queue its own Redis
  database (``--baseline-redis-url``; by default the ``--redis-url`` database + 1), so the two
  versions never see each other's rows or keys.

The report adds, per round, ``platform / platform@REF`` of ``N / consume`` (and of ``N / net``)
with the median and the range over the rounds: above 1.0 the current code drains faster.

Exits non-zero when a job is lost (queue not drained within ``--timeout``, fewer runs than
jobs in the worker's stats (a platform worker that does not answer the stats request is
noted, and its ledger decides), fewer than N ledger rows in state succeeded (platform) or fewer
than N SUCCESS results (raw-tracked)). The ratios never change the exit status. A baseline
that cannot be checked out, migrated or imported from its own tree exits 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    import psycopg
    import redis
    from celery import Celery

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make ``bench.*`` importable
    sys.path.insert(0, str(REPO))

PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: queue + SEP + step, steps 1..9
UNACKED_KEYS = ("unacked", "unacked_index", "unacked_mutex")
DB_SCHEMA = "synth_bench"
BASELINE_SCHEMA = "synth_bench_baseline"  # --baseline: REF's ledger, never this one's
POLL_S = 0.01
CONFIRM_S = 0.2
PING_TIMEOUT_S = 0.1
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|Exception")
#: Emptied before each drain (those a version has: the event history is newer than 6666a79);
#: a table left to grow round after round would make later rounds dearer than earlier ones.
LEDGER_TABLES = (
    "synth_jobs",
    "synth_idempotency",
    "synth_effects",
    "synth_late_completions",
    "synth_job_events",
    "synth_job_history",
)


@dataclass(frozen=True)
class Target:
    label: str  # "raw" | "raw-tracked" | "platform" | "platform@REF"
    module: str  # ``celery -A`` argument
    queue: str
    task: str
    ledger: bool = False  # a platform app: its jobs are rows in a ledger schema

    @property
    def slug(self) -> str:
        """The label as it may appear in a worker's node name and a file name."""
        return re.sub(r"[^A-Za-z0-9._-]", "-", self.label.replace("@", "-at-"))


RAW = Target("raw", "bench.raw_app", "bench-raw", "bench.noop")
RAW_TRACKED = Target(
    "raw-tracked", "bench.raw_tracked_app", "bench-raw-tracked", "bench.noop_tracked"
)
PLATFORM = Target("platform", "synth_workers", "bench-platform", "bench.platform_noop", ledger=True)
#: ``--roundtrip``: plain Celery whose task first writes one row to Postgres and waits for it
#: (``bench/raw_app.py``): the most any design that claims each job in Postgres before
#: running it can drain with this pool, prefetch and acks.
RAW_ROUNDTRIP = Target(
    "raw+roundtrip", "bench.raw_app", "bench-raw-roundtrip", "bench.noop_roundtrip"
)
TARGETS = (RAW, RAW_TRACKED, PLATFORM)
RESULT_PREFIX = "celery-task-meta-"  # Celery's Redis result backend: one key per job


@dataclass
class Run:
    app: str
    round: int
    jobs: int
    enqueue_s: float = 0.0
    load_1m: float | None = None  # the machine's 1-minute load average before the drain
    startup_s: float | None = None
    drain_s: float | None = None
    net_s: float | None = None
    jobs_per_s: float | None = None  # N / (drain - startup)
    jobs_per_s_incl_startup: float | None = None  # N / drain
    first_take_s: float | None = None  # worker start until the backlog first shrank
    consume_s: float | None = None  # drain - first_take
    consume_jobs_per_s: float | None = None  # N / (drain - first_take)
    #: CPU milliseconds per job between the first take and the end of the drain, by part:
    #: ``worker`` (the worker's processes), ``postgres`` (the backends on the ledger's
    #: database), ``redis`` (the whole Redis server: others' commands count when it is shared)
    cpu_ms_per_job: dict[str, float] = field(default_factory=dict)
    worker_total: int | None = None  # tasks the worker accepted (its stats)
    ledger_states: dict[str, int] = field(default_factory=dict)
    result_states: dict[str, int] = field(default_factory=dict)  # raw-tracked: backend states
    late_completions: int | None = None
    startup_log: str = ""
    drain_log: str = ""
    log_problems: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class LedgerProbe:
    """The harness's own connection to one ledger schema.

    Plain SQL on the tables every version of the ledger has, so the same probe reads the
    current platform's schema and a baseline's (whose ``synth_workers`` is not importable here).
    """

    def __init__(self, database_url: str, schema: str) -> None:
        import psycopg

        self.schema = schema
        self.conn: psycopg.Connection[Any] = psycopg.connect(
            database_url, autocommit=True, options=f"-c search_path={schema}"
        )

    def reset(self) -> None:
        present = self.conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename = ANY(%s)",
            (self.schema, list(LEDGER_TABLES)),
        ).fetchall()
        self.conn.execute("TRUNCATE " + ", ".join(name for (name,) in present))

    def unfinished(self) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM synth_jobs WHERE state <> 'succeeded'"
        ).fetchone()
        return int(row[0]) if row else 0

    def states(self) -> tuple[dict[str, int], int]:
        rows = self.conn.execute("SELECT state, count(*) FROM synth_jobs GROUP BY state").fetchall()
        late = self.conn.execute("SELECT count(*) FROM synth_late_completions").fetchone()
        return {str(state): int(count) for state, count in rows}, int(late[0]) if late else 0

    def backends(self) -> list[int]:
        """Process ids of the other backends on this database (the worker's connections)."""
        rows = self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        ).fetchall()
        return [int(pid) for (pid,) in rows]

    def close(self) -> None:
        self.conn.close()


# --- CPU accounting (load-independent: what a job costs, not how long it waited) ------------
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # the fields after ``comm``


def _cpu_seconds(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def session_cpu(session: int) -> dict[int, float]:
    """CPU seconds of every live process of ``session`` (a worker started in its own)."""
    found: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None and int(fields[3]) == session:
                found[int(entry.name)] = _cpu_seconds(fields)
    return found


def pids_cpu(pids: list[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        fields = _proc_stat(pid)
        if fields is not None:
            found[pid] = _cpu_seconds(fields)
    return found


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


@dataclass
class CpuMark:
    worker: dict[int, float]
    postgres: dict[int, float]
    redis: float

    @classmethod
    def take(cls, session: int, side: Side) -> CpuMark:
        backends = side.ledger.backends() if side.ledger is not None else []
        return cls(session_cpu(session), pids_cpu(backends), redis_cpu(side.client))

    def per_job(self, later: CpuMark, jobs: int) -> dict[str, float]:
        """Milliseconds per job from this mark to ``later`` (a process that appeared in
        between counts from zero; one that ended in between is not counted)."""

        def spent(before: dict[int, float], after: dict[int, float]) -> float:
            return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())

        return {
            "worker": 1000 * spent(self.worker, later.worker) / jobs,
            "postgres": 1000 * spent(self.postgres, later.postgres) / jobs,
            "redis": 1000 * (later.redis - self.redis) / jobs,
        }


@dataclass
class Side:
    """One app as the harness sees it: where its worker runs, its queue and its rows."""

    target: Target
    client: redis.Redis  # the app's Redis database: its queue lists and unacked hash
    control: Celery  # ping and stats go over this app's broker
    enqueue: Callable[[int], float]  # enqueue N jobs with no worker running; seconds taken
    ledger: LedgerProbe | None = None  # the platform apps
    cwd: Path = REPO  # the worker's working directory
    env: dict[str, str] | None = None  # the worker's environment (None: this process's)


# --- environment -------------------------------------------------------------------------
def configure_environment(redis_url: str, database_url: str) -> None:
    """Set what the apps read at import; must run before importing any of them."""
    os.environ["REDIS_URL"] = redis_url
    os.environ["BENCH_REDIS_URL"] = redis_url
    os.environ["DATABASE_URL"] = database_url
    os.environ["SYNTH_DB_SCHEMA"] = DB_SCHEMA
    includes = [m for m in os.environ.get("SYNTH_INCLUDE", "").split(",") if m.strip()]
    if "bench.platform_tasks" not in includes:
        includes.append("bench.platform_tasks")
    os.environ["SYNTH_INCLUDE"] = ",".join(includes)


def load_app(target: Target) -> Celery:
    if target is RAW or target is RAW_ROUNDTRIP:
        from bench.raw_app import app as raw

        return raw
    if target is RAW_TRACKED:
        from bench.raw_tracked_app import app as raw_tracked

        return raw_tracked
    import bench.platform_tasks  # noqa: F401 - registers bench.platform_noop
    from synth_workers import app as synth

    return synth


# --- redis -------------------------------------------------------------------------------
def queue_keys(queue: str) -> list[str]:
    return [queue] + [f"{queue}{PRIORITY_SEP}{step}" for step in range(1, 10)]


def backlog(side: Side) -> tuple[int, int]:
    """(messages waiting in the queue's ten lists, jobs taken but not finished).

    Celery's jobs in flight are the entries of kombu's ``unacked`` hash. The platform keeps
    no such hash (its leases are in the ledger: ``synth_workers/broker.py``), so for it
    (``side.ledger``), once the lists are empty, the ledger's unfinished rows are counted.
    """
    client, queue, ledger = side.client, side.target.queue, side.ledger
    pipe = client.pipeline(transaction=False)
    for key in queue_keys(queue):
        pipe.llen(key)
    pipe.hlen("unacked")
    *lengths, unacked = pipe.execute()
    waiting = sum(int(n) for n in lengths)
    if ledger is not None and waiting == 0:
        unacked += ledger.unfinished()
    return waiting, int(unacked)


def clean_redis(client: redis.Redis, queue: str) -> None:
    client.delete(*queue_keys(queue))
    if client.hlen("unacked"):
        print("  note: stale entries in the unacked hash (an earlier run died); deleted")
        client.delete(*UNACKED_KEYS)


def result_keys(client: redis.Redis) -> list[bytes]:
    return list(client.scan_iter(match=f"{RESULT_PREFIX}*", count=1000))


def clean_results(client: redis.Redis) -> None:
    """Delete Celery's result keys (raw-tracked) so each round counts only its own jobs."""
    keys = result_keys(client)
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])


def clean_events(client: redis.Redis) -> None:
    """Delete the platform's event streams (``synth:events:*``) so each round starts alike,
    as the raw-tracked app's result keys are deleted."""
    keys = list(client.scan_iter(match="synth:events:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])


def result_states(client: redis.Redis) -> dict[str, int]:
    """How many result keys are in each state (STARTED is overwritten by SUCCESS)."""
    counts: dict[str, int] = {}
    keys = result_keys(client)
    for i in range(0, len(keys), 1000):
        for raw in client.mget(keys[i : i + 1000]):
            try:
                state = str(json.loads(raw)["status"])
            except (TypeError, ValueError, KeyError):
                state = "unreadable"
            counts[state] = counts.get(state, 0) + 1
    return counts


# --- workers -----------------------------------------------------------------------------
def worker_command(target: Target, node: str, concurrency: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        target.module,
        "worker",
        "-Q",
        target.queue,
        "-n",
        node,
        "-P",
        "prefork",
        "-c",
        str(concurrency),
        "--without-mingle",
        "--without-gossip",
        "-l",
        "WARNING",
    ]


def start_worker(side: Side, node: str, concurrency: int, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            worker_command(side.target, node, concurrency),
            cwd=side.cwd,
            env=side.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        print(f"  worker {proc.pid} ignored SIGTERM for {STOP_TIMEOUT_S:.0f}s; SIGKILL")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_ping(app: Celery, node: str, proc: subprocess.Popen[bytes], t0: float) -> float:
    """Seconds from ``t0`` until ``node`` answers a ping (resolution ~PING_TIMEOUT_S)."""
    while time.perf_counter() - t0 < STARTUP_TIMEOUT_S:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode} before answering ping")
        replies = app.control.ping(destination=[node], timeout=PING_TIMEOUT_S, limit=1)
        if any(node in reply for reply in replies or []):
            return time.perf_counter() - t0
    raise RuntimeError(f"worker did not answer ping within {STARTUP_TIMEOUT_S:.0f}s")


def worker_total(app: Celery, node: str, task: str) -> int | None:
    """How many ``task`` jobs the worker accepted, from its own stats."""
    replies = app.control.inspect(destination=[node], timeout=5.0, limit=1).stats() or {}
    stats = replies.get(node)
    if not stats:
        return None
    return int(stats.get("total", {}).get(task, 0))


def log_problems(path: Path, limit: int = 20, width: int = 400) -> list[str]:
    """The log's warning, error and traceback lines (the first ``limit``, each cut at ``width``
    characters: a JSON log line carries its whole traceback)."""
    if not path.exists():
        return []
    text = path.read_text(errors="replace")
    lines = [
        ln if len(ln) <= width else ln[:width] + " ..."
        for ln in text.splitlines()
        if PROBLEM.search(ln)
    ]
    if len(lines) > limit:
        lines = [*lines[:limit], f"... and {len(lines) - limit} more"]
    return lines


# --- enqueue -----------------------------------------------------------------------------
def enqueue_celery(app: Celery, target: Target, n: int) -> float:
    """Plain Celery (raw, raw-tracked): ``apply_async`` on one producer."""
    t = time.perf_counter()
    task = app.tasks[target.task]
    with app.producer_or_acquire() as producer:
        for _ in range(n):
            task.apply_async(queue=target.queue, producer=producer)
    return time.perf_counter() - t


def enqueue_platform(n: int) -> float:
    import synth_workers

    t = time.perf_counter()
    for _ in range(n):
        synth_workers.enqueue(PLATFORM.task, {}, queue=PLATFORM.queue)
    return time.perf_counter() - t


def platform_variant(
    target: Target, client: redis.Redis, database_url: str, env: dict[str, str]
) -> Side:
    """A platform app of this checkout on ``target``'s own queue, its worker run with ``env``
    on top of this environment (another mode or setting, measured beside ``PLATFORM``)."""
    import synth_workers

    def enqueue(n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            synth_workers.enqueue(target.task, {}, queue=target.queue)
        return time.perf_counter() - t

    probe = LedgerProbe(database_url, DB_SCHEMA)
    return Side(target, client, synth_workers.app, enqueue, probe, env={**os.environ, **env})


def local_side(target: Target, client: redis.Redis, args: argparse.Namespace) -> Side:
    """An app of this checkout, run from the repository root with this environment."""
    app = load_app(target)
    if target is PLATFORM:
        return Side(
            target, client, app, enqueue_platform, LedgerProbe(args.database_url, DB_SCHEMA)
        )
    return Side(target, client, app, lambda n: enqueue_celery(app, target, n))


# --- baseline (--baseline REF) -----------------------------------------------------------
# Run in the baseline's tree with its environment: prints where ``synth_workers`` and the
# bench task module were imported from, after enqueueing argv[1] jobs with that code.
BASELINE_SCRIPT = """
import json, sys, time
import synth_workers
import bench.platform_tasks
n = int(sys.argv[1])
t = time.perf_counter()
for _ in range(n):
    synth_workers.enqueue("bench.platform_noop", {}, queue="bench-platform")
seconds = time.perf_counter() - t
print("BENCH-BASELINE " + json.dumps({
    "synth_workers": synth_workers.__file__,
    "platform_tasks": bench.platform_tasks.__file__,
    "enqueue_s": seconds,
}), flush=True)
"""


class BaselineError(RuntimeError):
    """The baseline could not be set up as asked (checkout, migration, imports)."""


def next_redis_db(url: str) -> str:
    """``url`` with its database number + 1 (mod 16): the baseline's own Redis database."""
    parts = urlsplit(url)
    path = parts.path.strip("/")
    db = int(path) if path.isdigit() else 0
    return urlunsplit(parts._replace(path=f"/{(db + 1) % 16}"))


def git(*argv: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(REPO), *argv], check=False, capture_output=True, text=True
    )
    if done.returncode:
        raise BaselineError(f"git {' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout.strip()


class Baseline:
    """The platform at git revision ``ref``, in its own checkout, schema and Redis database."""

    def __init__(self, ref: str, args: argparse.Namespace) -> None:
        self.ref = ref
        self.commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
        self.redis_url: str = args.baseline_redis_url
        self.tree = Path(tempfile.mkdtemp(prefix="synth-drain-baseline-")).resolve()
        self.target = Target(
            f"platform@{ref}", PLATFORM.module, PLATFORM.queue, PLATFORM.task, True
        )
        self.imported: dict[str, str] = {}
        try:
            git("worktree", "add", "--detach", str(self.tree), self.commit)
        except BaselineError:
            self.tree.rmdir()
            raise
        try:
            self.side = self.prepare(args)
        except BaseException:
            self.remove()
            raise

    def prepare(self, args: argparse.Namespace) -> Side:
        """Check the tree's imports, migrate its schema, connect to its Redis database."""
        import redis as redis_lib
        from celery import Celery

        env = dict(os.environ)
        env.update(
            REDIS_URL=self.redis_url,
            BENCH_REDIS_URL=self.redis_url,
            DATABASE_URL=args.database_url,
            SYNTH_DB_SCHEMA=BASELINE_SCHEMA,
            PYTHONPATH=os.pathsep.join(
                [str(self.tree), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        )
        self.env = env
        self.check_imports(self.run_script(0))  # before anything writes with that code
        migrate = self.run(["-m", "synth_workers.cli", "db", "migrate"])
        self.migrate_output = migrate.strip()
        control = Celery("bench-baseline-control", broker=self.redis_url)
        control.conf.update(
            accept_content=["json"], task_serializer="json", result_serializer="json"
        )
        client = redis_lib.Redis.from_url(self.redis_url)
        client.ping()
        return Side(
            self.target,
            client,
            control,
            self.enqueue,
            LedgerProbe(args.database_url, BASELINE_SCHEMA),
            cwd=self.tree,
            env=env,
        )

    def run(self, argv: list[str]) -> str:
        """Run ``python ARGV`` in the baseline's tree with its environment; its stdout."""
        done = subprocess.run(
            [sys.executable, *argv],
            check=False,
            cwd=self.tree,
            env=self.env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
        )
        if done.returncode:
            raise BaselineError(
                f"baseline {self.ref}: python {' '.join(argv[:3])}... exited {done.returncode}:\n"
                f"{done.stdout[-2000:]}{done.stderr[-4000:]}"
            )
        return done.stdout

    def run_script(self, n: int) -> dict[str, Any]:
        out = self.run(["-c", BASELINE_SCRIPT, str(n)])
        lines = [ln for ln in out.splitlines() if ln.startswith("BENCH-BASELINE ")]
        if not lines:
            raise BaselineError(f"baseline {self.ref}: the probe printed no report:\n{out}")
        report: dict[str, Any] = json.loads(lines[-1].split(" ", 1)[1])
        return report

    def check_imports(self, report: dict[str, Any]) -> None:
        """Fail loudly unless both modules came from the baseline's tree."""
        for module in ("synth_workers", "platform_tasks"):
            path = Path(report[module]).resolve()
            if not path.is_relative_to(self.tree):
                raise BaselineError(
                    f"baseline {self.ref}: {module} was imported from {path}, "
                    f"not from the baseline's tree {self.tree}"
                )
            self.imported[module] = str(path)

    def enqueue(self, n: int) -> float:
        """Enqueue with REF's own code (a process in its tree): its rows are REF's format."""
        report = self.run_script(n)
        self.check_imports(report)
        return float(report["enqueue_s"])

    def close(self) -> None:
        self.side.control.close()
        if self.side.ledger is not None:
            self.side.ledger.close()
        self.remove()

    def remove(self) -> None:
        done = subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(self.tree)],
            check=False,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            print(f"  note: could not remove the baseline's worktree: {done.stderr.strip()}")


# --- one measurement ---------------------------------------------------------------------
def measure(side: Side, rnd: int, args: argparse.Namespace, logs: Path) -> Run:
    target, client, app = side.target, side.client, side.control
    run = Run(app=target.label, round=rnd, jobs=args.jobs)
    host = socket.gethostname()

    clean_redis(client, target.queue)
    if side.ledger is not None:
        side.ledger.reset()
        clean_events(client)
    if target is RAW_TRACKED:
        clean_results(client)

    # 1. start-up on the empty queue.
    node = f"bench-{target.slug}-r{rnd}-startup@{host}"
    log = logs / f"{target.slug}-r{rnd}-startup.log"
    run.startup_log = str(log)
    t0 = time.perf_counter()
    proc = start_worker(side, node, args.concurrency, log)
    try:
        run.startup_s = wait_for_ping(app, node, proc, t0)
    except RuntimeError as exc:
        run.errors.append(f"startup: {exc}")
    finally:
        stop_worker(proc)
    run.log_problems += [f"[startup] {line}" for line in log_problems(log)]
    if run.errors:
        return run
    clean_redis(client, target.queue)  # nothing should be there; be sure
    if target is RAW_TRACKED:
        clean_results(client)

    # 2. the backlog, enqueued with no worker running (not timed).
    try:
        run.enqueue_s = side.enqueue(args.jobs)
    except BaselineError as exc:
        run.errors.append(f"enqueue: {exc}")
        return run
    waiting, unacked = backlog(side)
    if waiting != args.jobs or unacked:
        run.errors.append(
            f"after enqueue: {waiting} waiting, {unacked} unacked, expected {args.jobs} and 0"
        )
        return run

    # 3. the drain, timed from the worker's process start.
    node = f"bench-{target.slug}-r{rnd}-drain@{host}"
    log = logs / f"{target.slug}-r{rnd}-drain.log"
    run.drain_log = str(log)
    run.load_1m = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = start_worker(side, node, args.concurrency, log)
    try:
        end: float | None = None
        first: float | None = None
        first_mark: CpuMark | None = None
        end_mark: CpuMark | None = None
        while True:
            now = time.perf_counter()
            if now - t0 > args.timeout:
                waiting, unacked = backlog(side)
                run.errors.append(
                    f"not drained within {args.timeout:g}s: {waiting} waiting, {unacked} unacked"
                )
                break
            if proc.poll() is not None:
                run.errors.append(f"worker exited with {proc.returncode} during the drain")
                break
            state = backlog(side)
            if first is None and state != (args.jobs, 0):
                first = now  # the worker took its first message (resolution POLL_S)
                first_mark = CpuMark.take(proc.pid, side)
            if state == (0, 0):
                # kombu pops a message (BRPOP) before it writes it to the unacked hash: a
                # last message can be in neither for an instant. Confirm a moment later.
                end = now
                end_mark = CpuMark.take(proc.pid, side)
                time.sleep(CONFIRM_S)
                if backlog(side) == (0, 0):
                    break
                end = None
            time.sleep(POLL_S)
        if end is not None:
            run.drain_s = end - t0
            run.first_take_s = None if first is None else first - t0
            run.worker_total = worker_total(app, node, target.task)
            if first_mark is not None and end_mark is not None:
                run.cpu_ms_per_job = first_mark.per_job(end_mark, args.jobs)
    finally:
        stop_worker(proc)
    run.log_problems += [f"[drain] {line}" for line in log_problems(log)]

    # 4. checks and figures.
    if run.drain_s is not None:
        if run.worker_total is None and side.ledger is not None:
            # The platform's ledger check below (N rows succeeded) still decides; a worker
            # whose stats reply cannot be encoded (see its log) must not hide the figures.
            run.log_problems.append(
                "[drain] the worker did not answer the stats request; "
                "the ledger's succeeded rows are the only check of this run"
            )
        elif run.worker_total is None:
            run.errors.append("the worker did not answer the stats request")
        elif run.worker_total < args.jobs:
            run.errors.append(
                f"the worker ran {run.worker_total} of {args.jobs} jobs (some were dropped)"
            )
        elif run.worker_total > args.jobs:
            run.log_problems.append(
                f"[drain] the worker accepted {run.worker_total} messages "
                f"for {args.jobs} jobs (duplicates delivered)"
            )
        assert run.startup_s is not None
        run.net_s = run.drain_s - run.startup_s
        run.jobs_per_s_incl_startup = args.jobs / run.drain_s
        if run.first_take_s is not None:
            run.consume_s = run.drain_s - run.first_take_s
            if run.consume_s > 0:
                run.consume_jobs_per_s = args.jobs / run.consume_s
        if run.net_s > 0:
            run.jobs_per_s = args.jobs / run.net_s
        else:
            run.log_problems.append("drain <= startup: use more --jobs")
    if side.ledger is not None:
        run.ledger_states, run.late_completions = side.ledger.states()
        succeeded = run.ledger_states.get("succeeded", 0)
        if succeeded != args.jobs:
            run.errors.append(
                f"ledger: {succeeded} of {args.jobs} jobs succeeded (states: {run.ledger_states})"
            )
    if target is RAW_TRACKED:
        run.result_states = result_states(client)
        clean_results(client)
        succeeded = run.result_states.get("SUCCESS", 0)
        if succeeded != args.jobs:
            run.errors.append(
                f"result backend: {succeeded} of {args.jobs} jobs SUCCESS "
                f"(states: {run.result_states})"
            )
    return run


# --- report ------------------------------------------------------------------------------
def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarise(runs: list[Run], label: str) -> dict[str, float | None]:
    mine = [r for r in runs if r.app == label]
    return {
        "startup_s": median([r.startup_s for r in mine]),
        "drain_s": median([r.drain_s for r in mine]),
        "net_s": median([r.net_s for r in mine]),
        "jobs_per_s": median([r.jobs_per_s for r in mine]),
        "jobs_per_s_incl_startup": median([r.jobs_per_s_incl_startup for r in mine]),
        "first_take_s": median([r.first_take_s for r in mine]),
        "consume_s": median([r.consume_s for r in mine]),
        "consume_jobs_per_s": median([r.consume_jobs_per_s for r in mine]),
        "enqueue_s": median([r.enqueue_s for r in mine]),
        **{
            f"cpu_ms_per_job_{part}": median([r.cpu_ms_per_job.get(part) for r in mine])
            for part in ("worker", "postgres", "redis")
        },
    }


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


RATIO_FIGURES = {  # ratio name: the Run field it divides
    "consume": "consume_jobs_per_s",
    "net": "jobs_per_s",
    "incl_startup": "jobs_per_s_incl_startup",
}


def per_round_ratios(runs: list[Run], app: str, baseline: str) -> list[dict[str, Any]]:
    """``app / baseline`` for each round in which both ran, one entry per round."""
    rows = []
    for rnd in sorted({r.round for r in runs}):
        mine = next((r for r in runs if r.round == rnd and r.app == app), None)
        base = next((r for r in runs if r.round == rnd and r.app == baseline), None)
        if mine is None or base is None:
            continue
        row: dict[str, Any] = {"round": rnd}
        for name, attr in RATIO_FIGURES.items():
            row[name] = ratio(getattr(mine, attr), getattr(base, attr))
        row["jobs_per_s_consume"] = {
            app: mine.consume_jobs_per_s,
            baseline: base.consume_jobs_per_s,
        }
        row["jobs_per_s_net"] = {app: mine.jobs_per_s, baseline: base.jobs_per_s}
        rows.append(row)
    return rows


def ratio_spread(rows: list[dict[str, Any]], name: str) -> dict[str, float | None]:
    """Median, lowest and highest of one per-round ratio."""
    values = [float(r[name]) for r in rows if r[name] is not None]
    return {
        "median": statistics.median(values) if values else None,
        "min": min(values) if values else None,
        "max": max(values) if values else None,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.drain",
        description="Time one worker draining a backlog of no-op jobs: plain Celery (with and "
        "without result tracking) vs the platform.",
    )
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per backlog (2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per app (3)")
    parser.add_argument("--concurrency", type=int, default=2, help="worker -c (2)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds a drain may take before the jobs count as lost (300)",
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "drain.json")
    parser.add_argument(
        "--baseline",
        metavar="REF",
        default=None,
        help="also measure the platform as it was at git revision REF (app platform@REF), "
        "from its own checkout, ledger schema and Redis database, in the same rounds",
    )
    parser.add_argument(
        "--roundtrip",
        action="store_true",
        help="also measure raw+roundtrip: plain Celery whose task writes one row to Postgres "
        "first (the floor of any claim-before-run design)",
    )
    parser.add_argument(
        "--baseline-redis-url",
        default=None,
        help="the baseline's Redis database (default: --redis-url's database + 1)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.rounds < 1 or args.concurrency < 1:
        parser.error("--jobs, --rounds and --concurrency must be >= 1")
    if args.baseline is not None:
        if args.baseline_redis_url is None:
            args.baseline_redis_url = next_redis_db(args.redis_url)
        if args.baseline_redis_url == args.redis_url:
            parser.error("--baseline-redis-url must differ from --redis-url")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_environment(args.redis_url, args.database_url)

    import redis as redis_lib

    from synth_workers import app as synth

    args.out = args.out.resolve()
    logs = args.out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    client = redis_lib.Redis.from_url(args.redis_url)
    client.ping()
    synth.ledger.migrate()
    load_app(PLATFORM)
    if PLATFORM.task not in synth.tasks:
        print(f"error: {PLATFORM.task} is not registered on synth_workers.app", file=sys.stderr)
        return 2

    with contextlib.ExitStack() as stack:
        local = TARGETS + ((RAW_ROUNDTRIP,) if args.roundtrip else ())
        sides = [local_side(t, client, args) for t in local]
        for side in sides:
            if side.ledger is not None:
                stack.callback(side.ledger.close)
        baseline: Baseline | None = None
        if args.baseline is not None:
            try:
                baseline = Baseline(args.baseline, args)
            except BaselineError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            stack.callback(baseline.close)
            sides.append(baseline.side)
        return run_rounds(args, sides, baseline, logs)


def round_order(sides: list[Side], rnd: int, baseline: bool = False) -> list[Side]:
    """The apps in round ``rnd``'s order, rotated each round (cancels drift).

    With a baseline (the last side), rounds go in pairs: both rounds of a pair use the same
    rotation, the second with the two platform apps swapped, so each is as often right
    after the other and in each position (a drain right after a platform drain shares the
    cores with Postgres's after-work on that drain's rows: --baseline HEAD read ~10 % slower
    when it always ran second). Use an even --rounds with --baseline.
    """
    if not baseline:
        shift = rnd % len(sides)
        return sides[shift:] + sides[:shift]
    base = list(sides)
    if rnd % 2:
        i, j = base.index(next(s for s in sides if s.target is PLATFORM)), len(base) - 1
        base[i], base[j] = base[j], base[i]
    shift = (rnd // 2) % len(base)
    return base[shift:] + base[:shift]


def run_rounds(
    args: argparse.Namespace, sides: list[Side], baseline: Baseline | None, logs: Path
) -> int:
    """Measure every app in every round (rotating the order), report, write the JSON."""
    from synth_workers.settings import mask_url

    targets = [side.target for side in sides]
    load_start = os.getloadavg()
    print(
        f"drain benchmark: {args.jobs} no-op jobs, {args.rounds} round(s), 1 worker "
        f"(prefork -c {args.concurrency}), redis {mask_url(args.redis_url)}, "
        f"ledger schema {DB_SCHEMA}; worker logs in {logs}; "
        f"load average {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}"
    )
    if baseline is not None:
        print(
            f"baseline {baseline.target.label}: commit {baseline.commit[:12]} checked out in "
            f"{baseline.tree}, redis {mask_url(baseline.redis_url)}, ledger schema "
            f"{BASELINE_SCHEMA}; imports {baseline.imported['synth_workers']} and "
            f"{baseline.imported['platform_tasks']}"
        )
    width = max(12, *(len(t.label) + 1 for t in targets))
    runs: list[Run] = []
    for rnd in range(args.rounds):
        for side in round_order(sides, rnd, baseline is not None):
            target = side.target
            run = measure(side, rnd, args, logs)
            runs.append(run)
            status = "ok" if run.ok else "FAILED: " + "; ".join(run.errors)
            print(
                f"  round {rnd} {target.label:<{width}} enqueue {run.enqueue_s:6.2f}s  "
                f"startup {fmt(run.startup_s)}s  drain {fmt(run.drain_s)}s  "
                f"net {fmt(run.net_s)}s  {fmt(run.jobs_per_s, '.0f')} jobs/s | "
                f"first take {fmt(run.first_take_s)}s  consume {fmt(run.consume_s)}s  "
                f"{fmt(run.consume_jobs_per_s, '.0f')} jobs/s  load {fmt(run.load_1m)}  {status}"
            )
            if run.cpu_ms_per_job:
                print(
                    "      CPU ms/job: "
                    + "  ".join(f"{k} {v:.3f}" for k, v in run.cpu_ms_per_job.items())
                )
            for line in run.log_problems:
                print(f"      log: {line}")

    load_end = os.getloadavg()
    medians = {t.label: summarise(runs, t.label) for t in targets}
    plat = medians[PLATFORM.label]

    def ratios_vs(baseline: Target) -> dict[str, float | None]:
        base = medians[baseline.label]
        return {
            "consume": ratio(plat["consume_jobs_per_s"], base["consume_jobs_per_s"]),
            "net": ratio(plat["jobs_per_s"], base["jobs_per_s"]),
            "incl_startup": ratio(plat["jobs_per_s_incl_startup"], base["jobs_per_s_incl_startup"]),
        }

    vs_tracked, vs_raw = ratios_vs(RAW_TRACKED), ratios_vs(RAW)
    print()
    print(f"medians over {args.rounds} round(s), N = {args.jobs}")
    print(
        f"{'app':<{width}}{'startup':>9}{'drain':>8}{'net':>7}{'jobs/s':>8}{'incl.':>7}"
        f"{'1st take':>10}{'consume':>9}{'jobs/s':>8}   (seconds; jobs/s = N / net,"
    )
    print(f"{'':<{width + 48}}    incl. = N / drain, last = N / consume)")
    for label, m in medians.items():
        print(
            f"{label:<{width}}{fmt(m['startup_s']):>9}{fmt(m['drain_s']):>8}{fmt(m['net_s']):>7}"
            f"{fmt(m['jobs_per_s'], '.0f'):>8}{fmt(m['jobs_per_s_incl_startup'], '.0f'):>7}"
            f"{fmt(m['first_take_s']):>10}{fmt(m['consume_s']):>9}"
            f"{fmt(m['consume_jobs_per_s'], '.0f'):>8}"
        )
    print()
    print("CPU ms per job, first take to drained (medians; load-independent, unlike jobs/s;")
    print("redis is the whole server's CPU: others' commands count when it is shared)")
    for label, m in medians.items():
        parts = ("worker", "postgres", "redis")
        cpu = [m[f"cpu_ms_per_job_{p}"] for p in parts]
        total = sum(c for c in cpu if c is not None) if any(c is not None for c in cpu) else None
        print(
            f"  {label:<{width}}"
            + "".join(f"{p} {fmt(c, '.3f'):>6}  " for p, c in zip(parts, cpu, strict=True))
            + f"total {fmt(total, '.3f')}"
        )

    def verdict(value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.3f} ({'meets' if value >= 0.9 else 'below'} the 0.9 target)"

    print()
    print("throughput ratio, N / (drain - first take)  <- read these")
    print(
        f"  platform/raw-tracked (like-for-like: both record every job's state): "
        f"{verdict(vs_tracked['consume'])}"
    )
    print(
        f"  platform/raw         (bare Celery, records nothing):                 "
        f"{verdict(vs_raw['consume'])}"
    )
    if RAW_ROUNDTRIP.label in medians:
        vs_rt = ratios_vs(RAW_ROUNDTRIP)
        rt_raw = ratio(
            medians[RAW_ROUNDTRIP.label]["consume_jobs_per_s"],
            medians[RAW.label]["consume_jobs_per_s"],
        )
        print(
            f"  raw+roundtrip/raw    (one Postgres write waited for per job, nothing else): "
            f"{fmt(rt_raw, '.3f')}"
        )
        print(
            f"  platform/raw+roundtrip (what the platform does besides that write):      "
            f"{fmt(vs_rt['consume'], '.3f')}"
        )
    print("other figures (startup by ping: up to 1 s late, see bench/README.md)")
    for name, r in (("platform/raw-tracked", vs_tracked), ("platform/raw", vs_raw)):
        print(
            f"  {name:<20} N / (drain - startup): {fmt(r['net'], '.3f')}   "
            f"N / drain (incl. start-up): {fmt(r['incl_startup'], '.3f')}"
        )

    vs_base: dict[str, Any] | None = None
    if baseline is not None:
        vs_base = report_baseline(runs, medians, baseline, ratios_vs(baseline.target))
    loads = [r.load_1m for r in runs if r.load_1m is not None]
    print(
        f"load average (1 min) before each drain {fmt(min(loads, default=None))}-"
        f"{fmt(max(loads, default=None))}; at the end "
        f"{load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}"
    )

    failed = [r for r in runs if not r.ok]
    result = {
        "benchmark": "drain",
        "config": {
            "jobs": args.jobs,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "timeout_s": args.timeout,
            "redis_url": mask_url(args.redis_url),
            "database_url": mask_url(args.database_url),
            "db_schema": DB_SCHEMA,
            "worker_command": {
                t.label: worker_command(t, "NODE", args.concurrency) for t in targets
            },
            "baseline": None
            if baseline is None
            else {
                "ref": baseline.ref,
                "commit": baseline.commit,
                "redis_url": mask_url(baseline.redis_url),
                "db_schema": BASELINE_SCHEMA,
                "imported": baseline.imported,
                "migrate": baseline.migrate_output,
            },
        },
        "machine": {
            "host": socket.gethostname(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            **{pkg: version(pkg) for pkg in ("celery", "kombu", "redis", "psycopg")},
            "loadavg_start": list(load_start),
            "loadavg_end": list(load_end),
        },
        "runs": [{**asdict(r), "ok": r.ok} for r in runs],
        "median": medians,
        # The two figures to read: N / (drain - first take), platform over each baseline.
        "throughput_ratio_consume_vs_raw_tracked": vs_tracked["consume"],  # like-for-like
        "throughput_ratio_consume_vs_raw": vs_raw["consume"],  # bare Celery, records nothing
        "ratios": {
            "platform/raw-tracked": vs_tracked,
            "platform/raw": vs_raw,
            **({} if vs_base is None else {vs_base["name"]: vs_base["ratio_of_medians"]}),
        },
        # --baseline REF: platform / platform@REF per round, their median and range.
        "vs_baseline": vs_base,
        # Kept from the two-app version: platform/raw.
        "throughput_ratio": vs_raw["net"],
        "throughput_ratio_consume": vs_raw["consume"],
        "throughput_ratio_incl_startup": vs_raw["incl_startup"],
        "target_ratio": 0.9,
        "ok": not failed,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")
    if failed:
        print(
            f"FAILED: {len(failed)} run(s) lost jobs or did not drain; see the logs above",
            file=sys.stderr,
        )
        return 1
    return 0


def report_baseline(
    runs: list[Run],
    medians: dict[str, dict[str, float | None]],
    baseline: Baseline,
    of_medians: dict[str, float | None],
) -> dict[str, Any]:
    """Print platform / platform@REF per round with its median and range; return them."""
    label = baseline.target.label
    name = f"platform/{label}"
    col = max(16, len(label) + 2)
    rows = per_round_ratios(runs, PLATFORM.label, label)
    spread = {figure: ratio_spread(rows, figure) for figure in RATIO_FIGURES}
    print()
    print(f"{name} per round, jobs/s  <- above 1.0: the current code drains faster")
    print(f"  {'':<7}{'N / consume':-^{10 + col + 8}}  {'N / net':-^{10 + col + 8}}")
    print(
        f"  {'round':<7}{'platform':>10}{label:>{col}}{'ratio':>8}  "
        f"{'platform':>10}{label:>{col}}{'ratio':>8}"
    )
    for row in rows:
        consume, net = row["jobs_per_s_consume"], row["jobs_per_s_net"]
        print(
            f"  {row['round']:<7}{fmt(consume[PLATFORM.label], '.0f'):>10}"
            f"{fmt(consume[label], '.0f'):>{col}}{fmt(row['consume'], '.3f'):>8}  "
            f"{fmt(net[PLATFORM.label], '.0f'):>10}{fmt(net[label], '.0f'):>{col}}"
            f"{fmt(row['net'], '.3f'):>8}"
        )
    for figure in ("consume", "net"):
        sp = spread[figure]
        field_name = RATIO_FIGURES[figure]
        print(
            f"  {name} (N / {figure}): median of the per-round ratios "
            f"{fmt(sp['median'], '.3f')}, range {fmt(sp['min'], '.3f')}-{fmt(sp['max'], '.3f')}; "
            f"ratio of the medians {fmt(of_medians[figure], '.3f')} "
            f"({fmt(medians[PLATFORM.label][field_name], '.0f')} / "
            f"{fmt(medians[label][field_name], '.0f')} jobs/s)"
        )
    return {
        "name": name,
        "ref": baseline.ref,
        "commit": baseline.commit,
        "per_round": rows,
        "median": {figure: spread[figure]["median"] for figure in RATIO_FIGURES},
        "range": {
            figure: [spread[figure]["min"], spread[figure]["max"]] for figure in RATIO_FIGURES
        },
        "ratio_of_medians": of_medians,
    }


if __name__ == "__main__":
    sys.exit(main())
