"""A finished job's events leave Redis after SYNTH_EVENTS_GRACE and stay readable from the
ledger (issue 14: Redis memory must not grow with throughput × retention). Real Redis, real
Postgres, real worker processes and a real ``events serve`` process."""

from __future__ import annotations

import json
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

import tests.events_tasks  # noqa: F401 - registers the tasks on the app
from synth_workers import app, enqueue
from synth_workers.events import Event, EventWriter, job_stream, subscribe
from synth_workers.events.history import HistoryArchive, ledger_history
from synth_workers.ledger import Ledger
from synth_workers.lifecycle import JobEvent
from synth_workers.settings import Settings
from tests.conftest import wait_until
from tests.events_server import EventsServer
from tests.test_events import sse_messages, token

GRACE = 1
#: Workers of these tests: the events tasks, and a one-second grace (the default is 10 s).
ENV = {
    "SYNTH_INCLUDE": "tests.e2e_tasks,tests.events_tasks",
    "SYNTH_EVENTS_GRACE": str(GRACE),
}
STEPS = "tests.events_tasks.steps"
GATED = "tests.events_tasks.gated"


def stored_events(job_id: str) -> int:
    with app.ledger.connection() as conn:
        row = conn.execute(
            "SELECT jsonb_array_length(events) FROM synth_job_history WHERE job_id = %s",
            (job_id,),
        ).fetchone()
    return 0 if row is None else int(row[0])


def gone(client: Any, job_id: str, timeout: float = 30) -> bool:
    return wait_until(lambda: client.exists(job_stream(job_id)) == 0, timeout=timeout)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    """A redis-server of the test's own on 127.0.0.1 (a free port of 16400-16499)."""
    for port in range(16410, 16500):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                break
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    proc = subprocess.Popen(
        [*argv, "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    assert wait_until(up, timeout=10), f"redis-server on port {port} did not start"
    yield client
    client.close()
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def server(rclient: Any, tmp_path: Path) -> Iterator[EventsServer]:
    started = EventsServer(tmp_path, {}).start()
    yield started
    assert started.stop() == 0, started.output()
    assert "Traceback" not in started.all_output(), started.all_output()


# --- with real workers -------------------------------------------------------------------
def test_stream_goes_after_the_grace_and_the_history_is_read_from_the_ledger(
    rclient: Any, start_worker: Any
) -> None:
    start_worker("default", env=ENV)
    handle = enqueue(STEPS, {"n": 5}, user_id="amy")
    live = list(handle.events(timeout=60))
    assert [e.kind for e in live] == ["queued", "started", *["progress"] * 5, "succeeded"]
    # the job's stream goes GRACE seconds after its events are in the ledger, not after
    # SYNTH_EVENTS_RETENTION (an hour)
    assert app.settings.events_retention == 3600
    assert gone(rclient, handle.id, timeout=GRACE + 20)
    assert stored_events(handle.id) == len(live)

    assert list(handle.events(timeout=5)) == live  # the same ids, the same fields
    for n in (0, 1, 4, len(live) - 2):
        assert list(handle.events(timeout=5, since=live[n].id)) == live[n + 1 :]
    assert list(subscribe(job_id=handle.id, user_id="amy", timeout=5)) == live
    assert list(subscribe(job_id=handle.id, user_id="bob", timeout=1)) == []
    assert handle.wait(timeout=5) == 5


def test_a_slow_reader_gets_the_rest_from_the_ledger_after_the_stream_went(
    rclient: Any, start_worker: Any
) -> None:
    gate = f"test-gate-{uuid.uuid4().hex}"
    handle = enqueue(GATED, {"n": 6, "pauses": [2], "gate": gate}, user_id="cy")
    start_worker("default", env=ENV)
    reader = iter(handle.events(timeout=60))
    got: list[Event] = []
    while not got or got[-1].kind != "progress" or got[-1].data["current"] != 2:
        got.append(next(reader))
    # the reader stops reading; the job ends and its stream goes meanwhile
    rclient.rpush(gate, 1)
    assert wait_until(lambda: handle.state().value == "succeeded", timeout=30)
    assert gone(rclient, handle.id, timeout=GRACE + 20)
    got.extend(reader)
    kinds = [e.kind for e in got]
    assert kinds == ["queued", "started", *["progress"] * 6, "succeeded"]
    assert [e.data["current"] for e in got if e.kind == "progress"] == list(range(1, 7))
    ids = [e.id for e in got]
    assert len(set(ids)) == len(ids)
    assert got == list(handle.events(timeout=5))


def test_sse_resume_across_the_stream_going_misses_nothing(
    server: EventsServer, start_worker: Any, rclient: Any
) -> None:
    gate = f"test-gate-{uuid.uuid4().hex}"
    handle = enqueue(GATED, {"n": 8, "pauses": [3], "gate": gate}, user_id="dee")
    start_worker("default", env=ENV)
    url = f"{server.url}/events"
    with httpx.Client(timeout=30) as client:
        first: list[dict[str, Any]] = []
        with client.stream("GET", url, params={"job": handle.id}, headers=token("dee")) as r:
            assert r.status_code == 200
            for message in sse_messages(r):
                first.append(message)
                data = message["data"]
                if data["kind"] == "progress" and data["data"]["current"] == 3:
                    break  # the client goes away mid-job
        rclient.rpush(gate, 1)  # the job goes on while it is away, ends, and its stream goes
        assert wait_until(lambda: handle.state().value == "succeeded", timeout=30)
        assert gone(rclient, handle.id, timeout=GRACE + 20)

        headers = {**token("dee"), "Last-Event-ID": first[-1]["id"]}
        with client.stream("GET", url, params={"job": handle.id}, headers=headers) as r:
            assert r.status_code == 200
            second = list(sse_messages(r))  # from the ledger; ends after the final event
        headers = {**token("dee"), "Last-Event-ID": second[-1]["id"]}
        assert client.get(url, params={"job": handle.id}, headers=headers).status_code == 204
        # a new reader from the start: the whole history, from the ledger
        with client.stream("GET", url, params={"job": handle.id}, headers=token("dee")) as r:
            whole = list(sse_messages(r))
        # someone else still gets nothing of it
        assert client.get(url, params={"job": handle.id}, headers=token("eve")).status_code == 403

    got = first + second
    ids = [m["id"] for m in got]
    assert len(ids) == len(set(ids)), "an event was sent twice"
    history = list(handle.events(timeout=5))
    assert ids == [e.id for e in history], "an event was missed"
    assert [m["data"] for m in got] == [e.as_dict() for e in history]
    assert [m["data"]["kind"] for m in got] == ["queued", "started", *["progress"] * 8, "succeeded"]
    assert whole == got
    assert second, "nothing arrived after the reconnect"


# --- the archive on its own (real Redis, real Postgres) ------------------------------------
def _job(writer: EventWriter, job_id: str, *kinds: str) -> None:
    about = {"task": "t", "queue": "q", "user_id": "fay"}
    writer.write([JobEvent(kind, job_id, attempt=1, **about) for kind in kinds])


def _archive(client: redis.Redis, ledger: Ledger, grace: int = GRACE) -> HistoryArchive:
    # its own thread would wait 60 s: the test's flush() is what writes
    return HistoryArchive(ledger, client, grace=grace, linger=60)


def test_keys_go_after_the_grace_not_the_retention(own_redis: redis.Redis) -> None:
    client = own_redis
    archive = _archive(client, app.ledger)
    writer = EventWriter(client, retention=3600, maxlen=5000, job_ttl=7200, archive=archive)
    jobs = [str(uuid.uuid4()) for _ in range(1000)]
    for n in range(0, len(jobs), 50):  # 50 jobs (150 events) per round trip
        batch = []
        for job in jobs[n : n + 50]:
            batch += [JobEvent(k, job, task="t", queue="q") for k in ("queued", "started")]
            batch.append(JobEvent("succeeded", job, task="t", queue="q", data={"runtime": 0.1}))
        writer.write(batch)
    assert client.dbsize() == 1 + len(jobs)
    assert archive.flush()
    assert 0 < client.ttl(job_stream(jobs[0])) <= GRACE
    assert wait_until(lambda: client.dbsize() == 1, timeout=GRACE + 10, interval=0.2)
    assert client.exists("synth:events:all")
    read = ledger_history(app.ledger)
    assert [e.kind for e in read(jobs[-1], "0-0")] == ["queued", "started", "succeeded"]
    assert read(jobs[-1], "0-0")[2].data == {"runtime": 0.1}
    assert sum(stored_events(job) for job in jobs[:20]) == 60


def test_a_stream_written_to_after_its_archive_is_kept_and_archived_again(
    own_redis: redis.Redis,
) -> None:
    client = own_redis
    archive = _archive(client, app.ledger)
    writer = EventWriter(client, retention=3600, maxlen=500, job_ttl=7200, archive=archive)
    job = str(uuid.uuid4())
    _job(writer, job, "queued", "started", "dead")
    _job(writer, job, "queued")  # replayed before the archive ran: the job lives again
    assert archive.flush()
    assert client.ttl(job_stream(job)) > 3600  # not cut to the grace: SYNTH_JOB_TTL
    assert stored_events(job) == 4  # queued, started, failed, dead
    _job(writer, job, "started", "succeeded")
    assert archive.flush()
    assert 0 < client.ttl(job_stream(job)) <= GRACE
    assert stored_events(job) == 7  # each event once
    client.delete(job_stream(job))
    history = subscribe(job_id=job, until_final=False, timeout=1.5)
    kinds = [e.kind for e in history]
    assert kinds == ["queued", "started", "failed", "dead", "queued", "started", "succeeded"]


def test_postgres_away_keeps_the_stream_and_the_archive_retries(
    own_redis: redis.Redis, database_url: str
) -> None:
    client = own_redis
    away = Ledger(
        Settings(database_url="postgresql://postgres@127.0.0.1:1/none", db_connect_timeout=1)
    )
    archive = _archive(client, away)
    writer = EventWriter(client, retention=3600, maxlen=500, job_ttl=7200, archive=archive)
    job = str(uuid.uuid4())
    _job(writer, job, "queued", "started", "succeeded")
    assert not archive.flush()  # kept, not dropped
    assert archive.dropped == 0
    assert client.ttl(job_stream(job)) > 3000  # the retention: nothing is lost
    assert stored_events(job) == 0
    archive.ledger = app.ledger  # Postgres is back
    assert archive.flush()
    assert stored_events(job) == 3
    assert 0 < client.ttl(job_stream(job)) <= GRACE


def test_history_of_jobs_gone_is_pruned(rclient: Any) -> None:
    handle = enqueue(STEPS, {"n": 1}, user_id="gus", delay=60)
    assert handle.cancel()
    assert [e.kind for e in handle.events(timeout=5)] == ["scheduled", "cancelled"]
    # this process wrote the final event: its archive (a background writer) stores it
    assert wait_until(lambda: stored_events(handle.id) == 2, timeout=10)
    app.ledger.apply_retention(dlq_max_age=1e9, dlq_max_count=10**6, job_ttl=1e9)
    assert stored_events(handle.id) == 2  # the job is still there
    with app.ledger.connection() as conn:
        conn.execute("DELETE FROM synth_jobs WHERE id = %s", (handle.id,))
    app.ledger.apply_retention(dlq_max_age=1e9, dlq_max_count=10**6, job_ttl=1e9)
    assert stored_events(handle.id) == 0


def test_events_of_non_ledger_ids_keep_their_retention(own_redis: redis.Redis) -> None:
    archive = _archive(own_redis, app.ledger)
    writer = EventWriter(own_redis, retention=60, maxlen=100, job_ttl=3600, archive=archive)
    _job(writer, "not-a-uuid", "started", "succeeded")
    assert archive.flush()
    assert 50 < own_redis.ttl(job_stream("not-a-uuid")) <= 60
    assert ledger_history(app.ledger)("not-a-uuid", "0-0") == []
    assert json.loads(json.dumps(ledger_history(app.ledger)(str(uuid.uuid4()), "$"))) == []


def test_migration_0012_moves_the_per_event_rows_into_one_row_per_job() -> None:
    """A ledger migrated to 0011 keeps its stored events: 0012 gathers them per job, in
    stream order, with the last id, and drops the per-event table (a scratch schema)."""
    migrations = Path(__file__).parent.parent / "synth_workers" / "ledger" / "migrations"
    schema = f"synth_mig_{uuid.uuid4().hex[:8]}"
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    with app.ledger.connection() as conn:
        try:
            conn.execute(f"CREATE SCHEMA {schema}")
            conn.execute(f"SET search_path TO {schema}")
            conn.execute((migrations / "0011_job_event_history.sql").read_text())
            for job, ms, seq, kind in [(a, 5, 1, "succeeded"), (a, 5, 0, "started"),
                                       (a, 4, 9, "queued"), (b, 7, 0, "queued")]:  # fmt: skip
                conn.execute(
                    "INSERT INTO synth_job_events VALUES (%s, %s, %s, %s)",
                    (job, ms, seq, json.dumps({"kind": kind})),
                )
            conn.execute((migrations / "0012_job_history_rows.sql").read_text())
            rows = {
                str(r[0]): r[1:]
                for r in conn.execute(
                    "SELECT job_id, last_ms, last_seq, events FROM synth_job_history"
                )
            }
            gone_table = conn.execute("SELECT to_regclass('synth_job_events')").fetchone()
        finally:
            conn.execute("RESET search_path")
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
    assert gone_table == (None,)
    assert rows[a][:2] == (5, 1)
    assert [e[2]["kind"] for e in rows[a][2]] == ["queued", "started", "succeeded"]
    assert [e[:2] for e in rows[a][2]] == [[4, 9], [5, 0], [5, 1]]
    assert rows[b] == (7, 0, [[7, 0, {"kind": "queued"}]])


def test_a_job_archived_twice_in_one_batch_is_one_row(own_redis: redis.Redis) -> None:
    """Two final events of one job reach the archive in one batch (dead, then replayed and
    succeeded before it wrote): one row, each event once, in order."""
    archive = _archive(own_redis, app.ledger)
    writer = EventWriter(own_redis, retention=3600, maxlen=500, job_ttl=7200, archive=archive)
    job = str(uuid.uuid4())
    _job(writer, job, "queued", "started", "dead")
    _job(writer, job, "queued", "started", "succeeded")
    assert archive.flush()
    with app.ledger.connection() as conn:
        found = conn.execute(
            "SELECT count(*) FROM synth_job_history WHERE job_id = %s", (job,)
        ).fetchone()
    assert found == (1,)
    kinds = [e.kind for e in ledger_history(app.ledger)(job, "0-0")]
    assert kinds == ["queued", "started", "failed", "dead", "queued", "started", "succeeded"]
