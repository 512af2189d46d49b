"""Messages that reach a worker but must never run: other serializers, unknown tasks."""

from __future__ import annotations

import uuid
from typing import Any

from synth_workers import app, enqueue
from synth_workers.routing import to_transport

from .conftest import wait_until

QUEUE = "refusal-test"


def _publish_raw(task_name: str, kwargs: dict[str, Any], serializer: str) -> str:
    """Publish a protocol-2 task message the way another producer could, bypassing enqueue."""
    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(task_id, task_name, args=(), kwargs=kwargs)
    with app.producer_or_acquire() as producer:
        producer.publish(
            message.body,
            routing_key=QUEUE,
            exchange="",
            serializer=serializer,
            headers=message.headers,
            priority=to_transport(5),
            declare=[],
            **message.properties,
        )
    return task_id


def test_pickle_message_is_never_executed(rclient: Any, start_worker: Any) -> None:
    _publish_raw("tests.e2e_tasks.side_effect", {"key": "pickled"}, "pickle")
    # same priority, enqueued after: once it ran, the worker has dealt with the pickle one
    after = enqueue("tests.e2e_tasks.side_effect", {"key": "json"}, queue=QUEUE)
    worker = start_worker(QUEUE)
    after.wait(timeout=30)
    assert rclient.get("test:count:json") == b"1"
    assert rclient.get("test:count:pickled") is None
    assert wait_until(lambda: "content_type" in worker.output(), timeout=5), worker.output()
    dead = app.ledger.list_jobs(states=("dead",), failure_class="rejected_message")
    assert [d["error_class"] for d in dead] == ["content_type"]
    assert dead[0]["task"] == "tests.e2e_tasks.side_effect"


def test_unknown_task_message_is_never_executed(rclient: Any, start_worker: Any) -> None:
    _publish_raw("tests.e2e_tasks.not_registered", {"key": "ghost"}, "json")
    after = enqueue("tests.e2e_tasks.side_effect", {"key": "known"}, queue=QUEUE)
    worker = start_worker(QUEUE)
    after.wait(timeout=30)
    assert rclient.get("test:count:known") == b"1"
    assert wait_until(lambda: "unknown_task" in worker.output(), timeout=5), worker.output()
    dead = app.ledger.list_jobs(states=("dead",), failure_class="rejected_message")
    assert [(d["task"], d["error_class"]) for d in dead] == [
        ("tests.e2e_tasks.not_registered", "unknown_task")
    ]


def test_undecodable_json_message_is_dead_lettered(rclient: Any, start_worker: Any) -> None:
    task_id = str(uuid.uuid4())
    message = app.amqp.as_task_v2(
        task_id, "tests.e2e_tasks.side_effect", args=(), kwargs={"key": "bad"}
    )
    with app.producer_or_acquire() as producer:
        producer.publish(
            b"{not json",
            routing_key=QUEUE,
            exchange="",
            content_type="application/json",
            content_encoding="utf-8",
            headers=message.headers,
            priority=to_transport(5),
            declare=[],
        )
    after = enqueue("tests.e2e_tasks.side_effect", {"key": "fine"}, queue=QUEUE)
    start_worker(QUEUE)
    after.wait(timeout=30)
    assert rclient.get("test:count:bad") is None
    dead = app.ledger.list_jobs(states=("dead",), failure_class="rejected_message")
    assert len(dead) == 1
    assert dead[0]["payload"]["raw"] == "{not json"
