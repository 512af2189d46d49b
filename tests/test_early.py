"""A plain enqueue publishes its message while its row's ``INSERT`` is in flight
(``synth_workers.ledger.early``): what a worker does with a message that comes before its
row, against real Postgres, Redis and worker processes.

- the enqueue returns with its row committed, the message marked ``EARLY``;
- a worker that finds no row waits for the enqueue's ``INSERT`` in flight, then claims
  the row, or tombstones the message when the ``INSERT`` never commits;
- an ``INSERT`` that reaches Postgres after the tombstone revives it and the enqueue
  publishes again: the job runs once;
- a message whose enqueue raised never runs.
"""

from __future__ import annotations

import json
import threading
import uuid
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from synth_workers import app, enqueue, enqueue_many, unrecorded
from synth_workers.ledger import early
from synth_workers.ledger.transport import ids_in_redis
from synth_workers.uuids import uuid4s

from .conftest import DATABASE_URL, wait_until

QUEUE = "early-test"
RECORD = "tests.e2e_tasks.record"


def _messages(rclient: Any) -> list[dict[str, Any]]:
    found = []
    for key in rclient.keys(f"{QUEUE}*"):
        if rclient.type(key) == b"list":
            found += [json.loads(raw) for raw in rclient.lrange(key, 0, -1)]
    return found


def _fixed_id(monkeypatch: pytest.MonkeyPatch, job_id: str) -> None:
    """The next enqueue makes ``job_id`` as its own fresh id."""
    monkeypatch.setattr(
        "synth_workers.producer.uuid", SimpleNamespace(uuid4=lambda: uuid.UUID(job_id))
    )


def _hold(job_id: str) -> psycopg.Connection[Any]:
    """A transaction that inserted a row for ``job_id`` and has not ended: an ``INSERT`` of
    the same id waits for it."""
    conn = psycopg.connect(DATABASE_URL)
    conn.execute(f"SET search_path = {app.settings.db_schema}")
    conn.execute(
        "INSERT INTO synth_jobs (id, task, queue, priority, payload, state) "
        "VALUES (%s, 'held', 'held', 5, '{}', 'cancelled')",
        (job_id,),
    )
    return conn


def _waiting_inserts() -> int:
    with app.ledger.connection() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE '%%INSERT INTO synth_jobs%%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_enqueue_returns_with_its_row_committed_and_the_message_marked(
    rclient: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    send, result = early.send_insert, early.PendingInsert.result
    from synth_workers import wire

    publish = wire.publish
    monkeypatch.setattr(early, "send_insert", lambda *a: order.append("insert") or send(*a))
    monkeypatch.setattr(
        early.PendingInsert, "result", lambda self: order.append("answer") or result(self)
    )
    monkeypatch.setattr(wire, "publish", lambda *a: order.append("publish") or publish(*a))
    handle = enqueue(RECORD, {"label": "marked"}, queue=QUEUE)
    assert order == ["insert", "publish", "answer"]
    row = app.ledger.get(handle.id)
    assert row is not None and row["state"] == "queued" and row["published_at"] is not None
    assert early.EARLY not in row["message"]["properties"], "the row's copy is unmarked"
    (message,) = _messages(rclient)
    assert message["headers"]["id"] == handle.id
    assert message["properties"][early.EARLY] is True
    # a key, a delay or an id of the caller's: the row first, then the publish, unmarked
    keyed = enqueue(RECORD, {"label": "keyed"}, queue=QUEUE, idempotency_key="early-k")
    assert order == ["insert", "publish", "answer", "publish"]
    assert [m["properties"].get(early.EARLY) for m in _messages(rclient)].count(None) == 1
    assert app.ledger.get(keyed.id) is not None


@pytest.mark.parametrize("ends", ["commit", "rollback"])
def test_a_tombstone_waits_for_the_insert_in_flight(rclient: Any, ends: str) -> None:
    job_id = str(uuid.uuid4())
    held = _hold(job_id)
    answer: list[bool] = []
    worker = threading.Thread(
        target=lambda: answer.append(early.tombstone_early(app.ledger, job_id, RECORD, QUEUE, 5))
    )
    worker.start()
    assert wait_until(lambda: _waiting_inserts() == 1, timeout=10)
    assert not answer, "the tombstone must wait for the transaction that holds the id"
    getattr(held, ends)()
    held.close()
    worker.join(timeout=10)
    row = app.ledger.get(job_id)
    assert row is not None
    if ends == "commit":
        assert answer == [False] and row["task"] == "held"
    else:
        assert answer == [True]
        assert (row["task"], row["state"], row["last_error"]) == (
            RECORD,
            "cancelled",
            early.EARLY_REASON,
        )


def test_an_insert_after_the_tombstone_revives_it_and_the_job_runs_once(
    rclient: Any, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = str(uuid.uuid4())
    assert early.tombstone_early(app.ledger, job_id, RECORD, QUEUE, 5)  # the worker was first
    _fixed_id(monkeypatch, job_id)
    handle = enqueue(RECORD, {"label": "revived"}, queue=QUEUE)
    assert handle.id == job_id
    row = app.ledger.get(job_id)
    assert row is not None
    assert (row["state"], row["last_error"], row["finished_at"]) == ("queued", None, None)
    assert row["payload"] == {"label": "revived"}
    # published again: the first message was the one the worker dropped (here, still there)
    assert [m["headers"]["id"] for m in _messages(rclient)] == [job_id, job_id]
    start_worker(QUEUE)
    assert handle.wait(timeout=30) == "revived"
    assert wait_until(lambda: not ids_in_redis(app, [QUEUE], {job_id}), timeout=10)
    assert rclient.lrange("test:order", 0, -1) == [b"revived"]
    row = app.ledger.get(job_id)
    assert row is not None and row["attempt"] == 1


def test_a_message_whose_enqueue_raised_never_runs(
    rclient: Any, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = early._params
    # Postgres refuses the row: its id is not a uuid (the message's is)
    monkeypatch.setattr(early, "_params", lambda row: [b"not-a-uuid", *params(row)[1:]])
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        enqueue(RECORD, {"label": "never"}, queue=QUEUE)
    monkeypatch.undo()
    (message,) = _messages(rclient)  # published while the row was refused
    job_id = message["headers"]["id"]
    assert app.ledger.get(job_id) is None
    start_worker(QUEUE)
    after = enqueue(RECORD, {"label": "after"}, queue=QUEUE)
    assert after.wait(timeout=30) == "after"
    assert wait_until(lambda: app.ledger.get(job_id) is not None, timeout=10)
    row = app.ledger.get(job_id)
    assert row is not None
    assert (row["state"], row["attempt"], row["started_at"]) == ("cancelled", 0, None)
    assert row["last_error"] == early.EARLY_REASON
    assert wait_until(lambda: not ids_in_redis(app, [QUEUE], {job_id}), timeout=10)
    assert rclient.lrange("test:order", 0, -1) == [b"after"]


def test_a_message_that_reaches_a_worker_before_its_row_runs_once(
    rclient: Any, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    start_worker(QUEUE)
    job_id = str(uuid.uuid4())
    held = _hold(job_id)  # the enqueue's INSERT waits behind it, its message already out
    _fixed_id(monkeypatch, job_id)
    handles: list[Any] = []
    producer = threading.Thread(
        target=lambda: handles.append(enqueue(RECORD, {"label": "once"}, queue=QUEUE))
    )
    producer.start()
    try:
        # the enqueue's INSERT and the worker's tombstone both wait for the held id
        assert wait_until(lambda: _waiting_inserts() == 2, timeout=30)
        assert not handles, "enqueue must not return before its row commits"
    finally:
        held.rollback()
        held.close()
    producer.join(timeout=30)
    (handle,) = handles
    assert handle.wait(timeout=30) == "once"
    assert wait_until(lambda: not ids_in_redis(app, [QUEUE], {job_id}), timeout=10)
    assert rclient.lrange("test:order", 0, -1) == [b"once"]
    row = app.ledger.get(job_id)
    assert row is not None and (row["state"], row["attempt"]) == ("succeeded", 1)


def _row(job_id: str) -> dict[str, Any]:
    """``publish.send``'s row for a job of :data:`RECORD` (what ``send_insert`` takes)."""
    return {
        "job_id": job_id,
        "task": RECORD,
        "queue": QUEUE,
        "priority": 5,
        "payload": {"label": job_id},
        "args": None,
        "max_attempts": None,
        "user_id": None,
        "message": {"headers": {"id": job_id}, "properties": {}},
        "expires_at": None,
        "correlation_id": None,
        "maybe_waited": False,
    }


def test_the_statement_is_prepared_again_after_psycopg_dropped_it(rclient: Any) -> None:
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    with app.ledger.connection() as conn:
        assert early.send_insert(conn, _row(first)).result() is False
        conn.execute("DEALLOCATE ALL")  # what psycopg sends after a ROLLBACK on it
        assert early.send_insert(conn, _row(second)).result() is False
    for job_id in (first, second):
        found = app.ledger.get(job_id)
        assert found is not None and (found["state"], found["payload"]) == (
            "queued",
            {"label": job_id},
        )


def test_a_row_that_committed_after_the_claim_looked_is_claimed(rclient: Any) -> None:
    # the worker's claim found no row; the enqueue's row committed before the worker looked
    # for it: a marked message's job is claimed then, an unmarked one's is not (its claim
    # saw the row and refused it)
    task = app.tasks[RECORD]
    marked, unmarked = str(uuid.uuid4()), str(uuid.uuid4())
    with app.ledger.connection() as conn:
        for job_id in (marked, unmarked):
            early.send_insert(conn, _row(job_id)).result()

    def request(job_id: str, properties: dict[str, Any]) -> Any:
        return SimpleNamespace(id=job_id, properties=properties, delivery_info={})

    claim = unrecorded.take(task, request(marked, {early.EARLY: True}), (), {}, "test-owner")
    assert claim is not None and (claim.job_id, claim.attempt) == (marked, 1)
    assert unrecorded.take(task, request(unmarked, {}), (), {}, "test-owner") is None
    found = app.ledger.get(unmarked)
    assert found is not None and found["state"] == "queued"


def test_enqueue_many_revives_a_tombstone_and_publishes_it_again(
    rclient: Any, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = str(uuid.uuid4())
    assert early.tombstone_early(app.ledger, job_id, RECORD, QUEUE, 5)  # the worker was first
    monkeypatch.setattr("synth_workers.bulk.uuid4s", lambda count: [job_id, *uuid4s(count - 1)])
    handles = enqueue_many(RECORD, [{"label": f"m{n}"} for n in range(3)], queue=QUEUE)
    assert handles[0].id == job_id
    row = app.ledger.get(job_id)
    assert row is not None and (row["state"], row["last_error"]) == ("queued", None)
    ids = [m["headers"]["id"] for m in _messages(rclient)]
    assert sorted(ids) == sorted([job_id, *(h.id for h in handles)])  # the revived one twice
    assert all(m["properties"][early.EARLY] is True for m in _messages(rclient))
    start_worker(QUEUE)
    assert [h.wait(timeout=30) for h in handles] == ["m0", "m1", "m2"]
    assert wait_until(lambda: not ids_in_redis(app, [QUEUE], {job_id}), timeout=10)
    assert sorted(rclient.lrange("test:order", 0, -1)) == [b"m0", b"m1", b"m2"]
