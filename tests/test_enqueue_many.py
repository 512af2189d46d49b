"""Bulk enqueue (``enqueue_many``) with real workers, real Redis and real Postgres: every
job runs once, handles come back in input order, one refused item refuses the call with
nothing written, idempotency keys within and across calls, a Postgres failure writes
nothing, and jobs whose publish failed after the commit are published by the reconciler."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis

from synth_workers import (
    PayloadTooLargeError,
    PayloadValidationError,
    ServiceUnavailableError,
    UnknownTaskError,
    app,
    enqueue,
    enqueue_many,
)
from synth_workers.app import SynthCelery, create_app
from synth_workers.ledger import early
from synth_workers.lifecycle import JobEvent
from synth_workers.settings import load_settings

from . import e2e_tasks  # noqa: F401 - its tasks registered before the apps built here
from .conftest import wait_until

QUEUE = "enqueue-many-test"
#: A redis-server of this module's own (ports 16500-16599 are this test's range).
OWN_REDIS_PORT = 16531


def _rows(where: str = "true", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    from psycopg.rows import dict_row

    with app.ledger.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(
            f"SELECT * FROM synth_jobs WHERE {where} ORDER BY enqueued_at", params
        ).fetchall()


def _queued_in_redis(client: Any, queue: str = QUEUE) -> int:
    return sum(int(client.llen(k)) for k in client.keys(f"{queue}*"))


def test_all_run_once_and_handles_keep_input_order(rclient: Any, start_worker: Any) -> None:
    labels = [f"job-{i:03d}" for i in range(120)]
    handles = enqueue_many(
        "tests.e2e_tasks.record", [{"label": x} for x in labels], queue=QUEUE, chunk_size=50
    )
    assert len(handles) == len(labels)
    assert len({h.id for h in handles}) == len(labels)
    assert not any(h.deduplicated for h in handles)
    assert _queued_in_redis(rclient) == len(labels)
    start_worker(QUEUE)
    for label, handle in zip(labels, handles, strict=True):
        assert handle.wait(timeout=60) == label  # the i-th handle is the i-th payload's job
    rows = _rows("task = %s", ("tests.e2e_tasks.record",))
    assert len(rows) == len(labels)
    assert {r["state"] for r in rows} == {"succeeded"}
    assert {r["attempt"] for r in rows} == {1}
    ran = [x.decode() for x in rclient.lrange("test:order", 0, -1)]
    assert sorted(ran) == labels  # each ran once
    assert ran == labels  # one worker, one priority: in the order given


def test_a_refused_item_refuses_the_call_and_nothing_is_written(rclient: Any) -> None:
    good = [{"order_id": i, "email": f"u{i}@example.com"} for i in range(5)]
    with pytest.raises(PayloadValidationError, match=r"(?s)item 3: .*order_id"):
        enqueue_many("tests.e2e_tasks.typed", [*good[:3], {"order_id": "x"}, good[4]])
    cap = app.settings.max_payload_bytes
    with pytest.raises(PayloadTooLargeError, match="item 1: .*SYNTH_MAX_PAYLOAD_BYTES"):
        enqueue_many("tests.e2e_tasks.record", [{"label": "a"}, {"label": "x" * cap}])
    with pytest.raises(PayloadValidationError, match="item 1: .*NUL"):
        enqueue_many("tests.e2e_tasks.record", [{"label": "a"}, {"label": "b\x00"}])
    with pytest.raises(PayloadValidationError, match="item 0: .*idempotency key"):
        enqueue_many("tests.e2e_tasks.record", [{"label": "a"}], idempotency_keys=["a\nb"])
    with pytest.raises(PayloadValidationError, match="2 keys for 1 payloads"):
        enqueue_many("tests.e2e_tasks.record", [{"label": "a"}], idempotency_keys=["a", "b"])
    with pytest.raises(PayloadValidationError, match="delay"):
        enqueue_many("tests.e2e_tasks.record", [{"label": "a"}], delay=-1)
    with pytest.raises(UnknownTaskError):
        enqueue_many("tests.e2e_tasks.nope", [{}])
    assert _rows() == []
    assert _queued_in_redis(rclient, "*") == 0
    assert enqueue_many("tests.e2e_tasks.record", []) == []


def test_idempotency_keys_within_and_across_calls(rclient: Any, start_worker: Any) -> None:
    first = enqueue_many(
        "tests.e2e_tasks.side_effect",
        [{"key": "k-a"}, {"key": "k-b"}, {"key": "k-a-again"}, {"key": "k-none"}],
        idempotency_keys=["A", "B", "A", None],
        queue=QUEUE,
    )
    assert first[2].id == first[0].id and first[2].deduplicated
    assert not first[0].deduplicated and not first[1].deduplicated
    single = enqueue(
        "tests.e2e_tasks.side_effect", {"key": "k-c"}, idempotency_key="C", queue=QUEUE
    )
    second = enqueue_many(
        "tests.e2e_tasks.side_effect",
        [{"key": "k-b2"}, {"key": "k-d"}, {"key": "k-c2"}],
        idempotency_keys=["B", "D", "C"],
        queue=QUEUE,
    )
    assert second[0].id == first[1].id and second[0].deduplicated
    assert second[2].id == single.id and second[2].deduplicated
    assert not second[1].deduplicated
    # the single enqueue sees the bulk's key too
    assert (
        enqueue("tests.e2e_tasks.side_effect", {"key": "x"}, idempotency_key="D", queue=QUEUE).id
        == second[1].id
    )
    assert len(_rows()) == 5  # A, B, None, C, D
    assert _queued_in_redis(rclient) == 5
    start_worker(QUEUE)
    for handle in (*first, *second):
        handle.wait(timeout=60)
    counts = {
        k: int(rclient.get(f"test:count:{k}") or 0) for k in ("k-a", "k-b", "k-none", "k-c", "k-d")
    }
    assert counts == {"k-a": 1, "k-b": 1, "k-none": 1, "k-c": 1, "k-d": 1}
    assert rclient.get("test:count:k-a-again") is None and rclient.get("test:count:k-b2") is None


def test_a_postgres_failure_in_a_later_chunk_writes_nothing(
    rclient: Any, start_worker: Any
) -> None:
    """A real statement error in the third chunk (a trigger refuses one row): the chunks
    before it roll back with it. The messages, published while the rows were being written
    (``synth_workers.ledger.early``), are marked, and a worker runs none of them."""
    with app.ledger.connection() as conn:
        conn.execute(
            "CREATE OR REPLACE FUNCTION test_refuse_boom() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN IF NEW.payload->>'label' = 'boom' THEN RAISE EXCEPTION 'boom refused'; "
            "END IF; RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER test_refuse_boom BEFORE INSERT ON synth_jobs FOR EACH ROW "
            "EXECUTE FUNCTION test_refuse_boom()"
        )
    try:
        labels = [f"l{i}" for i in range(30)]
        labels[25] = "boom"
        with pytest.raises(psycopg.errors.RaiseException, match="boom refused"):
            enqueue_many(
                "tests.e2e_tasks.record", [{"label": x} for x in labels], queue=QUEUE, chunk_size=10
            )
    finally:
        with app.ledger.connection() as conn:
            conn.execute("DROP TRIGGER IF EXISTS test_refuse_boom ON synth_jobs")
    assert _rows() == []
    messages = [
        json.loads(raw) for key in rclient.keys(f"{QUEUE}*") for raw in rclient.lrange(key, 0, -1)
    ]
    assert len(messages) == 30
    assert all(m["properties"][early.EARLY] is True for m in messages)
    start_worker(QUEUE)
    assert wait_until(lambda: _queued_in_redis(rclient) == 0 and len(_rows()) == 30, timeout=30)
    assert {(r["state"], r["attempt"], r["last_error"]) for r in _rows()} == {
        ("cancelled", 0, early.EARLY_REASON)
    }
    assert rclient.lrange("test:order", 0, -1) == []


def test_postgres_out_of_reach_refuses_with_its_name(rclient: Any) -> None:
    dead = create_app(
        load_settings(
            database_url="postgresql://postgres@127.0.0.1:16530/none", db_connect_timeout=2
        )
    )
    try:
        with pytest.raises(ServiceUnavailableError, match="Postgres.*DATABASE_URL"):
            enqueue_many(
                "tests.e2e_tasks.record", [{"label": "a"}, {"label": "b"}], queue=QUEUE, app=dead
            )
    finally:
        dead.close()
    assert _queued_in_redis(rclient) == 0


def test_redis_out_of_reach_refuses_before_writing(rclient: Any) -> None:
    dead = create_app(load_settings(redis_url="redis://127.0.0.1:16532/0", redis_timeout=2))
    try:
        with pytest.raises(ServiceUnavailableError, match="Redis.*REDIS_URL"):
            enqueue_many("tests.e2e_tasks.record", [{"label": "a"}], queue=QUEUE, app=dead)
    finally:
        dead.close()
    assert _rows() == []


class _OwnRedis:
    """A redis-server on :data:`OWN_REDIS_PORT` this test kills and restarts."""

    def __init__(self) -> None:
        self.url = f"redis://127.0.0.1:{OWN_REDIS_PORT}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is needed for this test"
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(OWN_REDIS_PORT),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        assert wait_until(answers, timeout=10), "redis-server did not start"
        client.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def own_redis() -> Iterator[_OwnRedis]:
    server = _OwnRedis()
    server.start()
    try:
        yield server
    finally:
        server.kill()


def test_redis_gone_after_the_commit_the_reconciler_publishes(
    rclient: Any, own_redis: _OwnRedis, start_worker: Any
) -> None:
    producer: SynthCelery = create_app(load_settings(redis_url=own_redis.url, redis_timeout=2))
    killed: list[str] = []

    def kill_redis(event: JobEvent) -> None:
        # told of the first job's `queued` event: the rows are committed, nothing sent yet
        if event.kind == "queued" and not killed:
            own_redis.kill()
            killed.append(event.job_id)

    producer.ledger.lifecycle.connect(kill_redis)
    try:
        handles = enqueue_many(
            "tests.e2e_tasks.side_effect",
            [{"key": f"late-{i}"} for i in range(20)],
            queue=QUEUE,
            app=producer,
        )
        assert killed, "the listener did not run: Redis was not killed after the commit"
        assert len(handles) == 20
        rows = _rows("queue = %s", (QUEUE,))
        assert len(rows) == 20 and {r["state"] for r in rows} == {"queued"}
        own_redis.start()  # empty: the messages never got there
        client = redis.Redis.from_url(own_redis.url)
        assert _queued_in_redis(client) == 0
        start_worker(QUEUE, env={"REDIS_URL": own_redis.url})
        for handle in handles:
            assert handle.wait(timeout=90) == handle.info()["payload"]["key"]
        counts = [int(client.get(f"test:count:late-{i}") or 0) for i in range(20)]
        assert counts == [1] * 20
        client.close()
    finally:
        producer.ledger.lifecycle.disconnect(kill_redis)
        producer.close()


def test_redis_gone_while_a_chunk_is_answered_every_job_still_runs_once(
    rclient: Any, own_redis: _OwnRedis, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk's messages are written to Redis, and their answer read only once the next
    chunk is built (``bulkrows.overlapped``). Redis dies in between, while the second chunk
    is built: whatever of the first chunk landed, the rows are committed, the reconciler
    publishes what is missing, and each of the 30 jobs runs exactly once."""
    from synth_workers import bulkrows

    producer: SynthCelery = create_app(load_settings(redis_url=own_redis.url, redis_timeout=2))
    real = bulkrows._columns
    built: list[int] = []

    def columns(*args: Any, **kwargs: Any) -> Any:
        built.append(1)
        if len(built) == 2:  # the first chunk's messages are written, not yet answered
            own_redis.kill()
        return real(*args, **kwargs)

    monkeypatch.setattr(bulkrows, "_columns", columns)
    try:
        handles = enqueue_many(
            "tests.e2e_tasks.side_effect",
            [{"key": f"mid-{i}"} for i in range(30)],
            queue=QUEUE,
            chunk_size=10,
            app=producer,
        )
        assert len(built) == 3 and len(handles) == 30
        rows = _rows("queue = %s", (QUEUE,))
        assert len(rows) == 30 and {r["state"] for r in rows} == {"queued"}
        own_redis.start()
        client = redis.Redis.from_url(own_redis.url)
        start_worker(QUEUE, env={"REDIS_URL": own_redis.url})
        for handle in handles:
            assert handle.wait(timeout=90) == handle.info()["payload"]["key"]
        assert [int(client.get(f"test:count:mid-{i}") or 0) for i in range(30)] == [1] * 30
        client.close()
    finally:
        producer.close()
