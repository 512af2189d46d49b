"""``group(...).apply_async()`` in bulk (``synth_workers.groups``): a group of one task's
plain signatures is written in one statement and published in one pipeline, with each
member's message and Redis entry what Celery's own group would have sent (real Redis and
Postgres); a refused member refuses the whole group; a worker runs it and ``get()`` returns
the results in order; any other group is Celery's own."""

from __future__ import annotations

import base64
import json
from typing import Any

import celery
import pytest
from celery import group

from synth_workers import app, bulk, groups, wire
from synth_workers.errors import PayloadTooLargeError, PayloadValidationError
from synth_workers.ledger import early
from synth_workers.message import CaptureProducer
from synth_workers.publish import placement
from synth_workers.routing import to_transport

from . import canvas_tasks as ct
from .conftest import wait_until

ENV = {"SYNTH_INCLUDE": "tests.e2e_tasks,tests.canvas_tasks"}


class _Counted:
    """Counts the calls of ``module.name`` (the real function still runs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> None:
        self.calls = 0
        real = getattr(module, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)


def _entries(rclient: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every message in the test queue's lists, by job id (the lists emptied)."""
    found = {}
    for key in rclient.keys(f"{ct.QUEUE}*"):
        for item in rclient.lrange(key, 0, -1):
            entry = json.loads(item)
            entry["properties"].pop("delivery_tag")  # a fresh uuid per publish, in kombu too
            entry["body"] = json.loads(base64.b64decode(entry["body"]))
            found[entry["headers"]["id"]] = (key.decode(), entry)
        rclient.delete(key)
    return found


def _stored(ids: list[str]) -> dict[str, dict[str, Any]]:
    with app.ledger.connection() as conn:
        rows = conn.execute(
            "SELECT id::text, message FROM synth_jobs WHERE id = ANY(%s::uuid[])", (ids,)
        ).fetchall()
    return {r[0]: r[1] for r in rows}


def test_members_are_celerys_messages_in_one_statement_and_one_pipeline(
    rclient: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    inserts = _Counted(monkeypatch, app.ledger, "send_jobs_early")
    pipelines = _Counted(monkeypatch, wire, "publish_started")
    members = [ct.sig(ct.add, i, y=i * 10) for i in range(5)]
    result = group(members).apply_async()
    assert (inserts.calls, pipelines.calls) == (1, 1)
    ids = [r.id for r in result.results]
    stored = _stored(ids)
    assert set(stored) == set(ids)
    ours = _entries(rclient)
    assert set(ours) == set(ids)
    task = app.tasks[ct.add.name]
    priority = to_transport(placement(task, task.priority, ct.QUEUE).priority)
    for index, job_id in enumerate(ids):
        # what Celery's group.apply_async asks of each member's send (its _apply_tasks)
        sent = {
            "task_id": job_id,
            "group_id": result.id,
            "group_index": index,
            "reply_to": app.thread_oid,
            "add_to_parent": False,
            "queue": ct.QUEUE,
            "priority": priority,
        }
        capture = CaptureProducer()
        celery.Task.apply_async(task, (index,), {"y": index * 10}, producer=capture, **sent)
        assert stored[job_id] == json.loads(json.dumps(capture.message()))
        celery.Task.apply_async(task, (index,), {"y": index * 10}, **sent)  # kombu publishes
        # Celery's, plus the mark of a message published while its row was written
        assert ours[job_id][1]["properties"].pop(early.EARLY) is True
        assert _entries(rclient) == {job_id: ours[job_id]}


def test_a_refused_member_refuses_the_group_and_nothing_is_written(rclient: Any) -> None:
    too_many = [ct.sig(ct.add, 1, 2), ct.sig(ct.add, 1, 2, 3)]
    with pytest.raises(TypeError, match="group member 1"):
        group(too_many).apply_async()
    cap = app.settings.max_payload_bytes
    too_big = [ct.sig(ct.add, 1, 2), ct.sig(ct.add, "x" * cap, 2)]
    with pytest.raises(PayloadTooLargeError, match="group member 1"):
        group(too_big).apply_async()
    not_json = [ct.sig(ct.add, 1, 2), ct.sig(ct.add, 1, 2), ct.sig(ct.add, {1, 2}, 2)]
    with pytest.raises(PayloadValidationError, match=r"group member 2: args\[0\]"):
        group(not_json).apply_async()
    with app.ledger.connection() as conn:
        assert conn.execute("SELECT count(*) FROM synth_jobs").fetchone() == (0,)
    assert rclient.keys(f"{ct.QUEUE}*") == []


def test_a_worker_runs_the_group_and_get_returns_results_in_order(
    rclient: Any, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    celerys = _Counted(monkeypatch, groups, "_celery_apply_async")
    start_worker(ct.QUEUE, concurrency=2, env=ENV)
    # the queue given to the group's apply_async, as in Celery: every member's
    members = (ct.add.s(i, i) for i in range(2 * bulk.CHUNK_SIZE + 7))
    result = group(members).apply_async(queue=ct.QUEUE)
    assert result.get(timeout=60) == [2 * i for i in range(2 * bulk.CHUNK_SIZE + 7)]
    assert result.successful() and result.completed_count() == 2 * bulk.CHUNK_SIZE + 7
    assert celerys.calls == 0
    with app.ledger.connection() as conn:
        by_group = conn.execute(
            "SELECT count(*), count(DISTINCT message->'headers'->>'group_index') FROM synth_jobs"
            " WHERE message->'headers'->>'group' = %s AND state = 'succeeded'",
            (result.id,),
        ).fetchone()
    assert by_group == (2 * bulk.CHUNK_SIZE + 7,) * 2
    # a group of two tasks is Celery's own, and runs as well
    mixed = group(ct.sig(ct.add, 1, 1), ct.sig(ct.collect, 5, key="mixed")).delay()
    assert celerys.calls == 1
    assert mixed.get(timeout=30) == [2, 5]
    assert wait_until(lambda: rclient.llen("test:collect:mixed") == 1)
    # so is one whose members are plain dicts (a signature's dict form, which Celery takes)
    dicts = group([dict(ct.sig(ct.add, 3, 3)), dict(ct.sig(ct.add, 4, 4))], app=app).delay()
    assert celerys.calls == 2
    assert dicts.get(timeout=30) == [6, 8]
