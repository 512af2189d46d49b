"""The enqueue API: typed refusals at enqueue, state, wait, cancel, idempotency, delay."""

from __future__ import annotations

import time
from typing import Any

import pytest

from synth_workers import (
    JobCancelledError,
    JobNotFoundError,
    JobState,
    JobTimeoutError,
    PayloadTooLargeError,
    PayloadValidationError,
    RoutingError,
    UnknownTaskError,
    app,
    enqueue,
)

from .conftest import wait_until

QUEUE = "enqueue-test"


def _nothing_queued(rclient: Any) -> bool:
    queue_keys = [
        k for k in rclient.keys("*") if not k.startswith(b"_kombu") and not k.startswith(b"celery")
    ]
    with app.ledger.connection() as conn:
        rows = conn.execute("SELECT count(*) FROM synth_jobs").fetchone()
    return queue_keys == [] and rows is not None and rows[0] == 0


def test_bad_payload_is_refused_and_nothing_queued(rclient: Any) -> None:
    with pytest.raises(PayloadValidationError, match="order_id"):
        enqueue("tests.e2e_tasks.typed", {"order_id": "seven", "email": "a@b.c"}, queue=QUEUE)
    with pytest.raises(PayloadValidationError, match="to"):
        enqueue("tasks.email.send_email", {"to": "not-an-address", "template": "welcome"})
    with pytest.raises(PayloadValidationError, match="template"):
        enqueue("tasks.email.send_email", {"to": "a@example.com", "template": "nope"})
    # a plain @app.task: the payload must match its signature
    with pytest.raises(PayloadValidationError, match="lable"):
        enqueue("tests.e2e_tasks.record", {"lable": "typo"}, queue=QUEUE)
    with pytest.raises(PayloadValidationError):
        enqueue("tests.e2e_tasks.record", ["not", "a", "mapping"], queue=QUEUE)  # type: ignore[arg-type]
    assert _nothing_queued(rclient)


def test_oversize_payload_is_refused(rclient: Any) -> None:
    cap = app.settings.max_payload_bytes
    with pytest.raises(PayloadTooLargeError, match="SYNTH_MAX_PAYLOAD_BYTES"):
        enqueue("tests.e2e_tasks.record", {"label": "x" * cap}, queue=QUEUE)
    assert _nothing_queued(rclient)
    # Celery's own delay()/apply_async() go through the same cap
    with pytest.raises(PayloadTooLargeError, match="SYNTH_MAX_PAYLOAD_BYTES"):
        app.tasks["tests.e2e_tasks.record"].delay(label="x" * cap)
    assert _nothing_queued(rclient)
    # just under the cap goes through
    enqueue("tests.e2e_tasks.record", {"label": "x" * (cap - 100)}, queue=QUEUE)


def test_unknown_task_is_refused(rclient: Any) -> None:
    with pytest.raises(UnknownTaskError, match="no.such.task"):
        enqueue("no.such.task", {})
    assert _nothing_queued(rclient)


def test_bad_priority_and_gpu_route_are_refused(rclient: Any) -> None:
    for bad in (10, -1, "urgent", True):
        with pytest.raises(RoutingError):
            enqueue("tests.e2e_tasks.record", {"label": "x"}, priority=bad)  # type: ignore[arg-type]
    with pytest.raises(RoutingError, match="embedding"):
        enqueue("tasks.email.send_email", {"to": "a@example.com", "template": "welcome"}, gpu=True)
    assert _nothing_queued(rclient)


def test_handle_state_wait_and_email_example(
    rclient: Any, start_worker: Any, tmp_path: Any
) -> None:
    outbox = tmp_path / "outbox"
    start_worker("email", env={"SYNTH_MAIL_OUTBOX": str(outbox)})
    h = enqueue(
        "tasks.email.send_email",
        {"to": "user@example.com", "template": "welcome", "context": {}},
        priority="high",
        delay=1,
        idempotency_key="welcome:user-123",
    )
    assert h.state() is JobState.SCHEDULED
    assert h.info()["queue"] == "email"
    result = h.wait(timeout=30)
    assert h.state() is JobState.SUCCEEDED
    assert (h.info()["started_at"] - h.info()["enqueued_at"]).total_seconds() >= 0.9
    eml = outbox / f"{h.id}.eml"
    assert result["path"] == str(eml.resolve())
    text = eml.read_text()
    assert "To: user@example.com" in text and "Welcome to SynthStack" in text
    # same key within the window: same job, nothing new queued
    again = enqueue(
        "tasks.email.send_email",
        {"to": "user@example.com", "template": "welcome", "context": {}},
        idempotency_key="welcome:user-123",
    )
    assert again.id == h.id and again.deduplicated
    assert not h.cancel()  # already finished
    assert len(list(outbox.glob("*.eml"))) == 1


def test_cancel_before_start_means_never_run(rclient: Any, start_worker: Any) -> None:
    start_worker(QUEUE)
    h = enqueue("tests.e2e_tasks.side_effect", {"key": "cancelled"}, delay=1.5, queue=QUEUE)
    assert h.cancel()
    assert h.state() is JobState.CANCELLED
    with pytest.raises(JobCancelledError):
        h.wait(timeout=5)
    # a job after it runs, proving the worker saw the cancelled one first
    later = enqueue("tests.e2e_tasks.side_effect", {"key": "after"}, delay=2.0, queue=QUEUE)
    later.wait(timeout=30)
    assert rclient.get("test:count:cancelled") is None


def test_wait_timeout_and_unknown_job(rclient: Any) -> None:
    h = enqueue("tests.e2e_tasks.record", {"label": "nobody-consumes"}, queue="no-worker")
    t0 = time.monotonic()
    with pytest.raises(JobTimeoutError):
        h.wait(timeout=0.3)
    assert time.monotonic() - t0 < 2
    assert h.state() is JobState.QUEUED
    from synth_workers import JobHandle

    with pytest.raises(JobNotFoundError):
        JobHandle("does-not-exist").state()


def test_typed_payload_model_reaches_the_task(rclient: Any, start_worker: Any) -> None:
    start_worker(QUEUE)
    from tests.e2e_tasks import Order

    h = enqueue("tests.e2e_tasks.typed", Order(order_id=42, email="a@b.c"), queue=QUEUE)
    assert h.wait(timeout=30) == {"order_id": 42}
    assert wait_until(lambda: rclient.get("test:count:typed:42") == b"1")


def test_wait_is_woken_by_the_jobs_announcement_not_by_its_poll(
    rclient: Any, start_worker: Any
) -> None:
    """``JobHandle.wait`` marks the job waited on and listens on Celery's result channel: a
    job that ends while it waits wakes it. Here its poll interval is an hour and it has no
    timeout: polling alone, it would read the row, then sleep for the hour."""
    import threading

    start_worker(QUEUE)
    warm = enqueue("tests.e2e_tasks.record", {"label": "warm"}, queue=QUEUE)
    assert warm.wait(timeout=30) == "warm"
    handle = enqueue("tests.e2e_tasks.long_running", {"key": "woken", "seconds": 1.0}, queue=QUEUE)
    assert wait_until(lambda: rclient.get("test:started:woken") is not None, timeout=30)
    got: list[Any] = []  # the job runs for a second yet: the waiter finds it running
    waiter = threading.Thread(target=lambda: got.append(handle.wait(poll=3600)), daemon=True)
    waiter.start()
    waiter.join(timeout=30)
    assert not waiter.is_alive(), "wait() was not woken by the job's announcement"
    assert got == ["finished"]
