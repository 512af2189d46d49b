"""revoke, purge and expires hold durably; cancellation is honoured at claim, retry and reap;
a completion write that fails for want of Postgres is retried, never a worker loss.

Against real worker processes, real Redis and real Postgres (a TCP proxy cuts Postgres off).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from synth_workers import app
from tests import e2e_tasks, revoke_tasks

from .conftest import DATABASE_URL, ROOT, Worker, wait_until
from .test_ops_flower import PASSWORD as FLOWER_PASSWORD
from .test_ops_flower import USER as FLOWER_USER
from .test_ops_flower import flower  # noqa: F401 - the fixture

QUEUE = "revoke-test"
ENV = {"SYNTH_INCLUDE": "tests.e2e_tasks,tests.revoke_tasks"}


def _row(job_id: str) -> dict[str, Any]:
    row = app.ledger.get(job_id)
    assert row is not None, job_id
    return row


def _state(job_id: str) -> str:
    return str(_row(job_id)["state"])


def _count(rclient: Any, key: str) -> int:
    return int(rclient.get(f"test:count:{key}") or 0)


def _drain(queue: str = QUEUE) -> None:
    """Run one more job on ``queue`` and wait for it: everything queued before it (one
    worker, one process, strict FIFO within a priority) has been delivered by then."""
    sentinel = e2e_tasks.side_effect.apply_async(kwargs={"key": "sentinel"}, queue=queue)
    assert wait_until(lambda: _state(sentinel.id) == "succeeded", timeout=60)


def _start(start_worker: Callable[..., Worker], queue: str = QUEUE, **env: str) -> Worker:
    return start_worker(queue, env={**ENV, **env})


def _started(rclient: Any, key: str) -> int:
    assert wait_until(lambda: rclient.get(f"test:pid:{key}") is not None, timeout=60)
    return int(rclient.get(f"test:pid:{key}"))


# --- revoke --------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["control", "async_result"])
def test_revoked_queued_job_never_runs_also_after_workers_restart(
    rclient: Any, start_worker: Callable[..., Worker], how: str
) -> None:
    job = e2e_tasks.side_effect.apply_async(kwargs={"key": "revoked"}, queue=QUEUE)
    assert _state(job.id) == "queued"
    if how == "control":
        app.control.revoke(job.id)
    else:
        app.AsyncResult(job.id).revoke()
    row = _row(job.id)
    assert row["state"] == "cancelled"
    assert row["finished_at"] is not None
    # A worker that never heard the broadcast (started after it) takes the message.
    worker = _start(start_worker)
    _drain()
    worker.stop()
    # ... and after a restart, past the reconciler's grace (SYNTH_RECONCILE_GRACE=2).
    _start(start_worker)
    _drain()
    reconciled = _row(job.id)
    assert wait_until(lambda: _state(job.id) == "cancelled" and rclient.llen(QUEUE) == 0)
    _drain()
    assert _count(rclient, "revoked") == 0
    assert reconciled["state"] == "cancelled"
    assert reconciled["attempt"] == 0


def test_revoke_of_ids_no_job_can_have(rclient: Any) -> None:
    app.control.revoke("not-a-uuid")  # a foreign message's id: broadcast only
    app.control.revoke(["00000000-0000-0000-0000-000000000000", "x"])  # unknown: nothing to do
    with pytest.raises(TypeError, match="task ids"):
        app.control.revoke([None])  # type: ignore[list-item]


def test_revoke_broadcast_by_a_plain_celery_client_is_recorded_by_the_worker(
    rclient: Any, start_worker: Callable[..., Worker], redis_url: str
) -> None:
    from celery import Celery

    worker = _start(start_worker)
    busy = revoke_tasks.gate.apply_async(kwargs={"key": "busy"}, queue=QUEUE)
    _started(rclient, "busy")
    job = e2e_tasks.side_effect.apply_async(kwargs={"key": "plain"}, queue=QUEUE)
    plain = Celery(broker=redis_url)
    try:  # only the workers hear of it: the ledger is not told by this client
        plain.control.revoke(job.id)
    finally:
        plain.close()
    assert _state(job.id) == "queued"
    rclient.set("test:go:busy", 1)  # the worker takes the revoked message next
    assert wait_until(lambda: _state(job.id) == "cancelled", timeout=30), _row(job.id)
    assert _state(busy.id) == "succeeded"
    worker.stop()
    _start(start_worker)
    _drain()
    assert _count(rclient, "plain") == 0


def test_flower_revoke_cancels_in_the_ledger(
    rclient: Any,
    start_worker: Callable[..., Worker],
    flower: tuple[str, Any],  # noqa: F811 - the fixture imported above
) -> None:
    import base64
    import urllib.request

    base, _ = flower
    job = e2e_tasks.side_effect.apply_async(kwargs={"key": "flower"}, queue=QUEUE)
    request = urllib.request.Request(f"{base}/api/task/revoke/{job.id}", data=b"", method="POST")
    token = base64.b64encode(f"{FLOWER_USER}:{FLOWER_PASSWORD}".encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
    assert _state(job.id) == "cancelled"
    _start(start_worker)
    _drain()
    assert _count(rclient, "flower") == 0


def test_revoke_terminate_stops_the_running_job_for_good(
    rclient: Any, start_worker: Callable[..., Worker]
) -> None:
    worker = _start(start_worker)
    job = revoke_tasks.gate.apply_async(kwargs={"key": "term"}, queue=QUEUE)
    pid = _started(rclient, "term")
    app.control.revoke(job.id, terminate=True, signal="SIGKILL")
    assert wait_until(lambda: not psutil.pid_exists(pid) or _zombie(pid), timeout=30)
    assert wait_until(lambda: _state(job.id) == "cancelled", timeout=30), _row(job.id)
    worker.stop()
    _start(start_worker)
    _drain()
    row = _row(job.id)
    assert row["state"] == "cancelled"
    assert row["worker_losses"] == 0
    assert _count(rclient, "term") == 1


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --- purge ---------------------------------------------------------------------------------
def _purged(job_ids: list[str]) -> bool:
    rows = [_row(i) for i in job_ids]
    return all(r["state"] == "cancelled" and r["last_error"] == "purged" for r in rows)


@pytest.mark.parametrize("how", ["cli", "control"])
def test_purge_cancels_what_it_purged(
    rclient: Any, start_worker: Callable[..., Worker], how: str
) -> None:
    jobs = [
        e2e_tasks.side_effect.apply_async(kwargs={"key": "purged"}, queue="default")
        for _ in range(3)
    ]
    ids = [j.id for j in jobs]
    if how == "cli":
        done = subprocess.run(
            [sys.executable, "-m", "celery", "-A", "synth_workers", "purge", "-f"],
            cwd=ROOT,
            env=os.environ.copy(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "Purged 3 messages" in done.stdout, done.stdout
    else:
        assert app.control.purge() == 3
    assert _purged(ids)
    assert rclient.llen("default") == 0
    # A worker started after, past the reconciler's grace: nothing comes back, nothing runs.
    _start(start_worker, "default")
    _drain("default")
    assert wait_until(lambda: _purged(ids) and rclient.llen("default") == 0)
    _drain("default")
    assert _count(rclient, "purged") == 0
    assert _purged(ids)


# --- expires -------------------------------------------------------------------------------
def test_delayed_job_that_expires_before_it_is_due_never_runs(
    rclient: Any, start_worker: Callable[..., Worker]
) -> None:
    _start(start_worker)
    job = e2e_tasks.side_effect.apply_async(
        kwargs={"key": "late"}, queue=QUEUE, countdown=3, expires=1
    )
    assert _row(job.id)["expires_at"] is not None
    assert wait_until(lambda: _state(job.id) == "cancelled", timeout=30)
    assert _row(job.id)["last_error"] == "expired"
    # Past its countdown: a job delayed longer than it has run since.
    after = e2e_tasks.side_effect.apply_async(kwargs={"key": "after"}, queue=QUEUE, countdown=3.5)
    assert wait_until(lambda: _state(after.id) == "succeeded", timeout=60)
    assert _count(rclient, "late") == 0
    assert _state(job.id) == "cancelled"


def test_queued_job_that_expired_before_a_worker_came_never_runs(
    rclient: Any, start_worker: Callable[..., Worker]
) -> None:
    job = e2e_tasks.side_effect.apply_async(kwargs={"key": "stale"}, queue=QUEUE, expires=0.3)
    expires_at = _row(job.id)["expires_at"]
    assert wait_until(lambda: app.ledger.now() > expires_at, timeout=10)
    _start(start_worker)
    _drain()
    assert wait_until(lambda: _state(job.id) == "cancelled")
    row = _row(job.id)
    assert str(row["last_error"]).startswith("expired")
    assert row["attempt"] == 0
    assert _count(rclient, "stale") == 0


def test_bad_expires_is_refused_with_a_typed_error(rclient: Any) -> None:
    from synth_workers.errors import PayloadValidationError

    for bad in ("tomorrow", float("nan"), [1]):
        with pytest.raises(PayloadValidationError, match="expires"):
            e2e_tasks.side_effect.apply_async(kwargs={"key": "x"}, queue=QUEUE, expires=bad)
    with app.ledger.connection() as conn:
        assert conn.execute("SELECT count(*) FROM synth_jobs").fetchone() == (0,)


# --- cancel honoured -----------------------------------------------------------------------
def test_cancelled_running_job_that_fails_is_not_retried(
    rclient: Any, start_worker: Callable[..., Worker]
) -> None:
    _start(start_worker)
    job = revoke_tasks.gate.apply_async(kwargs={"key": "cf", "fail": True}, queue=QUEUE)
    _started(rclient, "cf")
    app.control.revoke(job.id)
    assert _row(job.id)["cancel_requested"]
    rclient.set("test:go:cf", 1)
    assert wait_until(lambda: _state(job.id) == "cancelled", timeout=30), _row(job.id)
    _drain()
    assert _count(rclient, "cf") == 1
    assert _row(job.id)["attempt"] == 1


@pytest.mark.parametrize("kill", ["pool_process", "whole_worker"])
def test_cancelled_running_job_whose_worker_dies_ends_cancelled(
    rclient: Any, start_worker: Callable[..., Worker], kill: str
) -> None:
    worker = _start(start_worker)
    job = revoke_tasks.gate.apply_async(kwargs={"key": "kd"}, queue=QUEUE)
    pid = _started(rclient, "kd")
    app.control.revoke(job.id)  # no terminate: the job goes on running
    if kill == "pool_process":  # the worker's main process reports the loss
        os.kill(pid, signal.SIGKILL)
    else:  # nobody reports it: the lease expires and the reaper finds it
        os.killpg(worker.process.pid, signal.SIGKILL)
        worker.process.wait()
        _start(start_worker)
    assert wait_until(lambda: _state(job.id) == "cancelled", timeout=30), _row(job.id)
    _drain()
    row = _row(job.id)
    assert row["worker_losses"] == 0
    assert _count(rclient, "kd") == 1


# --- completion writes survive a Postgres outage -----------------------------------------------
class PostgresProxy:
    """A TCP proxy in front of the test Postgres that can cut every connection (and refuse
    new ones) and then let them through again: a Postgres outage seen from a worker."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open.clear()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self.open.set()

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.fixture
def pg_proxy() -> Iterator[PostgresProxy]:
    from psycopg.conninfo import conninfo_to_dict

    info = conninfo_to_dict(DATABASE_URL)
    proxy = PostgresProxy(str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432))
    yield proxy
    proxy.close()


def test_completion_write_failure_is_retried_not_a_worker_loss(
    rclient: Any, start_worker: Callable[..., Worker], pg_proxy: PostgresProxy
) -> None:
    from psycopg.conninfo import conninfo_to_dict

    info = conninfo_to_dict(DATABASE_URL)
    user = info.get("user") or "postgres"
    password = f":{info['password']}" if info.get("password") else ""
    url = f"postgresql://{user}{password}@127.0.0.1:{pg_proxy.port}/{info.get('dbname')}"
    # A lease longer than the outage: renewals resume before it lapses.
    worker = _start(start_worker, DATABASE_URL=url, SYNTH_LEASE_SECONDS="20")
    job = revoke_tasks.gate.apply_async(kwargs={"key": "pg"}, queue=QUEUE)
    _started(rclient, "pg")
    pg_proxy.cut()
    rclient.set("test:go:pg", 1)  # the job succeeds while Postgres is out of reach
    assert wait_until(lambda: "completions failed" in worker.output(), timeout=60), worker.output()[
        -3000:
    ]
    assert _state(job.id) == "running"
    pg_proxy.restore()
    assert wait_until(lambda: _state(job.id) == "succeeded", timeout=90), _row(job.id)
    row = _row(job.id)
    assert row["worker_losses"] == 0
    assert row["attempt"] == 1
    assert row["result"] == 1
    assert _count(rclient, "pg") == 1


def test_completion_refused_by_a_read_only_postgres_is_retried_not_a_worker_loss(
    rclient: Any, start_worker: Callable[..., Worker]
) -> None:
    """Postgres turns read-only under a finished job (a failover to a standby): every write
    fails at once, so a writer that gives up after a few quick tries drops the completion,
    the lease lapses and the job runs again as a worker loss."""
    import psycopg
    from psycopg import sql

    worker = _start(start_worker, SYNTH_LEASE_SECONDS="20")
    job = revoke_tasks.gate.apply_async(kwargs={"key": "ro"}, queue=QUEUE)
    _started(rclient, "ro")
    admin = psycopg.connect(
        DATABASE_URL,
        autocommit=True,
        options="-c default_transaction_read_only=off -c search_path=synth_test",
    )

    def read_only(on: bool) -> None:
        setting = (
            "SET default_transaction_read_only = on"
            if on
            else "RESET default_transaction_read_only"
        )
        admin.execute(
            sql.SQL("ALTER DATABASE {} " + setting).format(sql.Identifier(admin.info.dbname))
        )
        # every other session of this database starts again with the new default
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = "
            "current_database() AND pid <> pg_backend_pid()"
        )

    def row() -> tuple[Any, ...]:
        found = admin.execute(
            "SELECT state, worker_losses, attempt FROM synth_jobs WHERE id = %s", (job.id,)
        ).fetchone()
        assert found is not None
        return tuple(found)

    try:
        read_only(True)
        rclient.set("test:go:ro", 1)
        # kept read-only past a few quick tries (the backoff then waits 0.1, 0.2, 0.4, 0.8 s)
        assert wait_until(lambda: worker.output().count("completions failed") >= 4, 60), (
            worker.output()[-3000:]
        )
        assert row()[0] == "running"
    finally:
        read_only(False)
    try:
        assert wait_until(lambda: row()[0] == "succeeded", timeout=60), row()
        assert row() == ("succeeded", 0, 1)
        assert _count(rclient, "ro") == 1
    finally:
        admin.close()
        app.ledger.pool.check()  # this process's pooled sessions were ended too
