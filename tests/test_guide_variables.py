"""The operations guide's variables work under the guide's names: LOG_LEVEL,
SENTRY_ENVIRONMENT, DB_POOL_MIN, DB_POOL_MAX, DB_IDLE_TIMEOUT (milliseconds), REDIS_URL with
a password and ?ssl=true, DATABASE_URL with sslmode=require."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
from psycopg_pool import PoolTimeout

from synth_workers import ServiceUnavailableError, create_app
from synth_workers.errors import ConfigurationError
from synth_workers.ledger import Ledger
from synth_workers.logging import configure_logging
from synth_workers.platform import platform_of
from synth_workers.settings import load_settings

from .conftest import ROOT, wait_until
from .test_ops_logs import _restore_root
from .test_ops_sentry import sentry_server  # noqa: F401 - the fixture

CLI = [sys.executable, "-m", "synth_workers.cli"]


def test_log_level_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_LEVEL", "warning")
    settings = load_settings()
    assert settings.log_level == "WARNING"
    stream = io.StringIO()
    try:  # LOG_LEVEL wins over a worker's -l DEBUG
        assert configure_logging(settings, level="DEBUG", stream=stream, json_lines=True) == 30
        logging.getLogger("celery").info("hidden")
        logging.getLogger("celery").warning("shown")
    finally:
        _restore_root()
    assert [json.loads(line)["event"] for line in stream.getvalue().splitlines()] == ["shown"]
    monkeypatch.setenv("LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigurationError, match="LOG_LEVEL"):
        load_settings()


def test_sentry_environment_reaches_sentry(sentry_server: tuple[str, list[bytes]]) -> None:  # noqa: F811
    dsn, received = sentry_server
    code = (
        "import sentry_sdk\n"
        "from synth_workers.sentry import init_sentry\n"
        "from synth_workers.settings import load_settings\n"
        "assert init_sentry(load_settings())\n"
        "sentry_sdk.capture_message('guide variables')\n"
        "sentry_sdk.flush(timeout=10)\n"
    )
    env = {**os.environ, "SENTRY_DSN": dsn, "SENTRY_ENVIRONMENT": "staging-eu"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr

    def environments() -> list[str]:
        found = []
        for body in list(received):
            for line in body.splitlines():
                item = json.loads(line) if line.strip().startswith(b"{") else {}
                if item.get("message") == "guide variables" or item.get("logentry"):
                    found.append(item.get("environment"))
        return found

    assert wait_until(lambda: bool(environments()), timeout=20), received
    assert environments() == ["staging-eu"]


def _pool_size(ledger: Ledger) -> int:
    return int(ledger.pool.get_stats()["pool_size"])


def test_db_pool_min_max_and_idle_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_POOL_MIN", "2")
    monkeypatch.setenv("DB_POOL_MAX", "5")
    monkeypatch.setenv("DB_IDLE_TIMEOUT", "1000")  # milliseconds
    settings = load_settings()
    assert (settings.db_pool_min, settings.db_pool_size, settings.db_idle_timeout) == (2, 5, 1000)
    ledger = Ledger(settings)
    try:
        pool = ledger.pool
        assert (pool.min_size, pool.max_size, pool.max_idle) == (2, 5, 1.0)
        assert wait_until(lambda: _pool_size(ledger) == 2, timeout=10)

        # five at once: the pool grows to DB_POOL_MAX, and no further
        with contextlib.ExitStack() as stack:
            conns = [stack.enter_context(ledger.connection()) for _ in range(5)]
            assert len({id(c) for c in conns}) == 5
            assert _pool_size(ledger) == 5
            with pytest.raises(PoolTimeout), pool.connection(timeout=0.5):  # a sixth waits
                pass
        # idle above DB_POOL_MIN for DB_IDLE_TIMEOUT: closed again, down to DB_POOL_MIN
        started = time.monotonic()
        assert wait_until(lambda: _pool_size(ledger) == 2, timeout=20), _pool_size(ledger)
        assert time.monotonic() - started >= 1.0
    finally:
        ledger.close()


def test_pool_bounds_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_POOL_MIN", "6")
    monkeypatch.setenv("DB_POOL_MAX", "3")
    with pytest.raises(ConfigurationError, match="DB_POOL_MAX: .*at least DB_POOL_MIN"):
        load_settings()
    monkeypatch.setenv("DB_POOL_MIN", "1")
    monkeypatch.setenv("DB_IDLE_TIMEOUT", "5")  # seconds by mistake: refused, named
    with pytest.raises(ConfigurationError, match="DB_IDLE_TIMEOUT"):
        load_settings()


@pytest.fixture
def redis_with_password(tmp_path: Any) -> Iterator[int]:
    """A real redis-server of this test's own, with requirepass."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--requirepass", "p@ss:w/rd", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port, password="p@ss:w/rd")
    try:
        assert wait_until(lambda: _answers(client), timeout=10)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_redis_url_with_a_password(redis_with_password: int, database_url: str) -> None:
    port = redis_with_password
    env = {**os.environ, "DATABASE_URL": database_url}
    good = f"redis://:p%40ss%3Aw%2Frd@127.0.0.1:{port}/0"
    proc = subprocess.run([*CLI, "enqueue", "tasks.system.ping"], cwd=ROOT,
                          env={**env, "REDIS_URL": good}, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    queued = redis.Redis(port=port, password="p@ss:w/rd").keys("default*")
    assert queued, "the job's message is in the password-protected Redis"
    assert job_id

    bad = f"redis://:badpw123@127.0.0.1:{port}/0"
    proc = subprocess.run([*CLI, "enqueue", "tasks.system.ping"], cwd=ROOT,
                          env={**env, "REDIS_URL": bad}, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "redis://:***@127.0.0.1" in proc.stderr and "badpw123" not in proc.stderr


def test_redis_url_with_ssl_true_reaches_every_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:s3cret@127.0.0.1:6379/2?ssl=true")
    settings = load_settings()
    tls = "rediss://:s3cret@127.0.0.1:6379/2?ssl_cert_reqs=required"
    assert settings.broker_url == tls
    app = create_app(settings)
    try:
        assert app.conf.broker_url == tls and app.conf.result_backend == tls
        # the platform's own client: TLS, the password, certificates verified
        client = platform_of(app).redis
        pool = client.connection_pool
        assert pool.connection_class is redis.SSLConnection
        assert pool.connection_kwargs["password"] == "s3cret"
        assert pool.connection_kwargs["ssl_cert_reqs"] == "required"
        # kombu's connection parameters for the broker
        transport = app.connection_for_write().transport
        channel = transport.Channel.__new__(transport.Channel)
        channel.connection = transport
        params = transport.Channel._connparams(channel)
        assert params["connection_class"] is redis.SSLConnection
        assert params["password"] == "s3cret"
        assert params["ssl_cert_reqs"] == ssl.CERT_REQUIRED
        # the events writer's client
        from synth_workers.events import events_client

        events = events_client(settings.broker_url, 1.0).connection_pool
        assert events.connection_class is redis.SSLConnection
    finally:
        app.close()
    for value, error in (("maybe", "ssl must be true or false"),):
        monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:6379/0?ssl={value}")
        with pytest.raises(ConfigurationError, match=f"REDIS_URL: .*{error}"):
            load_settings()
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0?ssl=false")
    assert load_settings().broker_url == "redis://127.0.0.1:6379/0"


def test_database_url_with_sslmode_require_reaches_libpq(
    monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    with psycopg.connect(database_url, sslmode="prefer") as plain:
        if plain.info.pgconn.host.startswith(b"/"):
            pytest.skip("the test Postgres is on a unix socket, where libpq uses no TLS")
        server_has_tls = plain.info.pgconn.ssl_in_use
    sep = "&" if "?" in database_url else "?"
    monkeypatch.setenv("DATABASE_URL", f"{database_url}{sep}sslmode=require")
    ledger = Ledger(load_settings())
    try:
        if server_has_tls:  # the ledger's connections use it
            with ledger.connection() as conn:
                assert conn.info.pgconn.ssl_in_use
        else:  # libpq was told to require TLS, and refused to go on without it
            with pytest.raises(ServiceUnavailableError, match="SSL was required"):
                ledger.now()
    finally:
        ledger.close()


def test_db_connect_timeout_bounds_a_silent_postgres(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Postgres that accepts TCP and never answers: enqueue's ledger gives up within
    SYNTH_DB_CONNECT_TIMEOUT, once, instead of the pool's retries."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # the kernel completes handshakes; nobody ever answers
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{port}/x")
    monkeypatch.setenv("SYNTH_DB_CONNECT_TIMEOUT", "2")
    ledger = Ledger(load_settings())
    started = time.monotonic()
    try:
        with pytest.raises(ServiceUnavailableError, match="Postgres is not reachable"):
            ledger.now()
        took = time.monotonic() - started
        assert 1.5 <= took < 5, took
        assert len(accepted) == 1  # one try, not the pool's retries
    finally:
        stop.set()
        thread.join()
        ledger.close()
        for conn in accepted:
            conn.close()
        listener.close()
