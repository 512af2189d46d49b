"""DATABASE_READ_URL: the lag-tolerant reads go to a streaming replica, the fenced paths never.

The test starts its own primary and a replica made with ``pg_basebackup -R`` (tests/pgcluster.py,
ports 16910-16911); workers run against the primary with DATABASE_READ_URL set to the replica.
The replica logs every session and statement with its application_name, which is how the
tests see what reached it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from synth_workers import Settings, create_app, enqueue
from synth_workers.ledger.replica import READ_APPLICATION_NAME
from synth_workers.states import JobState
from tests.conftest import ROOT, Worker, wait_until
from tests.pgcluster import PROBE, ReplicatedPostgres

PORT = 16910
QUEUE = "replica-test"
SCHEMA = "synth_test"


@pytest.fixture(scope="module")
def cluster() -> Iterator[ReplicatedPostgres]:
    pg = ReplicatedPostgres(PORT)
    pg.start()
    try:
        yield pg
    finally:
        pg.close()


@pytest.fixture
def app(cluster: ReplicatedPostgres, redis_url: str) -> Iterator[Any]:
    """An app on the test's primary (reads from its replica), schema migrated, Redis flushed."""
    redis.Redis.from_url(redis_url).flushdb()
    built = create_app(
        Settings(
            redis_url=redis_url,
            database_url=cluster.primary.url,
            database_read_url=cluster.replica.url,
            db_schema=SCHEMA,
        )
    )
    from tests import e2e_tasks

    for task in (e2e_tasks.record, e2e_tasks.flaky, e2e_tasks.permanent):
        built.task(name=task.name)(task.run)  # the same tasks, on this app (for enqueue)
    built.ledger.migrate()
    with built.ledger.connection() as conn:
        conn.execute("TRUNCATE synth_jobs, synth_idempotency, synth_effects, synth_waits")
    cluster.wait_caught_up()
    try:
        yield built
    finally:
        built.close()


def _env(cluster: ReplicatedPostgres) -> dict[str, str]:
    return {"DATABASE_URL": cluster.primary.url, "DATABASE_READ_URL": cluster.replica.url}


def _cli(cluster: ReplicatedPostgres, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "synth_workers.cli", *args],
        cwd=ROOT,
        env={**os.environ, **_env(cluster)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _replica_log(cluster: ReplicatedPostgres, since: int = 0) -> list[tuple[str, str]]:
    """(application_name, message) of the replica's log lines from byte ``since`` on."""
    text = cluster.replica.log.read_bytes()[since:].decode(errors="replace")
    lines = []
    for line in text.splitlines():
        app_name, bar, message = line.partition("|")
        if bar:
            lines.append((app_name, message))
    return lines


def _sessions(lines: list[tuple[str, str]]) -> list[str]:
    """The application_name of every session the replica authorized ("" when none)."""
    found = [
        re.search(r"connection authorized: .*?(?:application_name=(\S+)|$)", message)
        for _, message in lines
    ]
    return [match.group(1) or "" for match in found if match]


_STATEMENT = re.compile(r"LOG:\s+(?:statement|execute [^:]*):\s*(.*)")


def _statements(lines: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(application_name, SQL) of every statement logged (simple and extended protocol)."""
    found = [(name, _STATEMENT.search(message)) for name, message in lines]
    return [(name, match.group(1)) for name, match in found if match]


def _run_jobs(app: Any, start: Callable[..., Worker], cluster: ReplicatedPostgres) -> list[str]:
    """Jobs end to end on a worker of the primary: 12 that succeed, one retried once, one
    dead; returns their ids once all are final (read on the primary)."""
    start(QUEUE, env={**_env(cluster), "SYNTH_INCLUDE": "tests.e2e_tasks"})
    ids = [
        enqueue("tests.e2e_tasks.record", {"label": f"r{i}"}, queue=QUEUE, app=app).id
        for i in range(12)
    ]
    ids.append(
        enqueue("tests.e2e_tasks.flaky", {"key": "rr", "fail_times": 1}, queue=QUEUE, app=app).id
    )
    ids.append(enqueue("tests.e2e_tasks.permanent", {"key": "rp"}, queue=QUEUE, app=app).id)
    final = {JobState.SUCCEEDED, JobState.DEAD}

    def done() -> bool:
        return all((row := app.ledger.get(i)) is not None and row["state"] in final for i in ids)

    assert wait_until(done, timeout=60), [app.ledger.get(i) for i in ids]
    return ids


def test_listings_status_and_dlq_are_served_by_the_replica(
    app: Any, cluster: ReplicatedPostgres, start_worker: Callable[..., Worker]
) -> None:
    ids = _run_jobs(app, start_worker, cluster)
    cluster.wait_caught_up()
    since = cluster.replica.log.stat().st_size

    listed = _cli(cluster, "jobs", "list", "--queue", QUEUE, "--json", "--limit", "100")
    assert listed.returncode == 0, listed.stderr
    assert {row["id"] for row in json.loads(listed.stdout)} == set(ids)
    dead = _cli(cluster, "dlq", "list", "--json")
    assert dead.returncode == 0, dead.stderr
    assert [row["task"] for row in json.loads(dead.stdout)] == ["tests.e2e_tasks.permanent"]
    status = _cli(cluster, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["dlq_size"] == 1

    statements = _statements(_replica_log(cluster, since))
    read = [sql for name, sql in statements if name == READ_APPLICATION_NAME]
    assert any("ORDER BY enqueued_at DESC" in s and "queue = " in s for s in read), statements
    assert any("FROM synth_jobs WHERE true AND state = ANY" in s for s in read), statements
    assert any(
        "extract(epoch FROM max(created_at)) FROM synth_periodic_slots" in s for s in read
    ), statements
    # the read pool's sessions are read-only: a write could not go through them
    with app.ledger.reads.connection() as conn:
        row = conn.execute("SHOW default_transaction_read_only").fetchone()
    assert row is not None and row[0] == "on"


def test_fenced_paths_never_touch_the_replica(
    app: Any, cluster: ReplicatedPostgres, start_worker: Callable[..., Worker]
) -> None:
    since = cluster.replica.log.stat().st_size
    ids = _run_jobs(app, start_worker, cluster)
    handle_state = [app.ledger.get(i)["state"] for i in ids]
    assert handle_state.count(JobState.SUCCEEDED) == 13 and handle_state.count(JobState.DEAD) == 1
    # what reached the replica while the worker (configured with DATABASE_READ_URL) claimed,
    # renewed, retried, dead-lettered and completed 14 jobs: only the test's own probes
    cluster.wait_caught_up()
    during = _replica_log(cluster, since)
    assert set(_sessions(during)) <= {PROBE}, _sessions(during)
    assert {name for name, _ in _statements(during)} <= {PROBE}, _statements(during)

    # control: the replica's log does show the platform's reads when they happen
    mark = cluster.replica.log.stat().st_size
    assert len(app.ledger.list_jobs(queue=QUEUE)) == 14
    after = _replica_log(cluster, mark)
    assert READ_APPLICATION_NAME in _sessions(after) or any(
        name == READ_APPLICATION_NAME for name, _ in _statements(after)
    ), after
    writes = re.compile(r"\b(UPDATE|INSERT|DELETE|FOR UPDATE|pg_advisory)", re.IGNORECASE)
    everything = _statements(_replica_log(cluster))
    assert not [s for _, s in everything if writes.search(s)], everything


def test_listing_fails_naming_the_replica_while_claims_go_on(
    app: Any, cluster: ReplicatedPostgres, start_worker: Callable[..., Worker]
) -> None:
    start_worker(QUEUE, env={**_env(cluster), "SYNTH_INCLUDE": "tests.e2e_tasks"})
    cluster.replica.stop()
    try:
        listed = _cli(cluster, "jobs", "list", "--json")
        assert listed.returncode == 3, (listed.stdout, listed.stderr)
        assert "read replica is not reachable" in listed.stderr
        assert "(DATABASE_READ_URL)" in listed.stderr
        assert listed.stderr.count("\n") == 1, listed.stderr
        # claims and completions go on, on the primary; reads after a write too
        handles = [
            enqueue("tests.e2e_tasks.record", {"label": f"d{i}"}, queue=QUEUE, app=app)
            for i in range(5)
        ]
        assert [h.wait(timeout=30) for h in handles] == [f"d{i}" for i in range(5)]
        shown = _cli(cluster, "jobs", "show", handles[0].id, "--json")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["state"] == JobState.SUCCEEDED
    finally:
        cluster.replica.start()
        cluster.wait_streaming()
    cluster.wait_caught_up()
    listed = _cli(cluster, "jobs", "list", "--queue", QUEUE, "--json")
    assert listed.returncode == 0, listed.stderr
    assert {row["id"] for row in json.loads(listed.stdout)} == {h.id for h in handles}


def test_without_a_read_url_reads_use_the_primary(database_url: str) -> None:
    from synth_workers.ledger import Ledger
    from synth_workers.settings import load_settings

    ledger = Ledger(load_settings(database_url=database_url, database_read_url=None))
    try:
        assert ledger.reads.url is None
        with ledger.reads.connection() as conn:
            row = conn.execute("SHOW default_transaction_read_only").fetchone()
        assert row is not None and row[0] == "off"  # the primary's own pool
        assert ledger.list_jobs(limit=1) is not None
    finally:
        ledger.close()


def test_read_url_is_checked_and_its_password_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    from synth_workers.errors import ConfigurationError
    from synth_workers.settings import load_settings

    monkeypatch.setenv("DATABASE_READ_URL", "mysql://u:s3cr3tpw@replica/db")
    with pytest.raises(ConfigurationError, match="DATABASE_READ_URL"):
        load_settings()
    monkeypatch.setenv("DATABASE_READ_URL", "postgresql://u:s3cr3tpw@replica:5432/db")
    settings = load_settings()
    assert settings.database_read_url == "postgresql://u:s3cr3tpw@replica:5432/db"
    assert "s3cr3tpw" not in repr(settings) and "u:***@replica" in repr(settings)


def test_unreachable_replica_is_named(database_url: str) -> None:
    from synth_workers.errors import ServiceUnavailableError
    from synth_workers.ledger import Ledger
    from synth_workers.settings import load_settings

    closed = f"postgresql://postgres:pw@127.0.0.1:{PORT + 5}/postgres"
    ledger = Ledger(load_settings(database_url=database_url, database_read_url=closed))
    try:
        with pytest.raises(ServiceUnavailableError) as caught:
            ledger.list_jobs()
        text = str(caught.value)
        assert "read replica is not reachable" in text and "(DATABASE_READ_URL)" in text
        assert "pw" not in text and "***" in text
        assert ledger.get(str(uuid.uuid4())) is None  # the primary still answers
    finally:
        ledger.close()
