"""The ledger announces each committed state change to lifecycle listeners, in order."""

from __future__ import annotations

import time
from typing import Any

import pytest

from synth_workers import app
from synth_workers.lifecycle import JobEvent


@pytest.fixture
def heard(rclient: Any) -> Any:
    events: list[JobEvent] = []
    listener = app.lifecycle.connect(events.append)
    yield events
    app.lifecycle.disconnect(listener)


def test_a_jobs_changes_are_announced_in_order(heard: list[JobEvent]) -> None:
    from tests.e2e_tasks import record

    handle = record.apply_async(kwargs={"label": "a"}, priority="high")
    claim = app.ledger.claim(handle.id, "test-owner")
    assert claim is not None
    assert app.ledger.retry_later(claim, 0, RuntimeError("boom"), "exception")
    again = app.ledger.promote_due()
    assert [j.id for j in again] == [handle.id]
    second = app.ledger.claim(handle.id, "test-owner")
    assert second is not None
    assert app.ledger.succeed(second, {"ok": True})
    # a late finish by the first attempt is refused and announced as such
    assert not app.ledger.succeed(claim, None)

    mine = [e for e in heard if e.job_id == handle.id]
    assert [e.kind for e in mine] == [
        "queued",
        "started",
        "retrying",
        "queued",
        "started",
        "succeeded",
        "late_refused",
    ]
    assert {e.task for e in mine} == {record.name}
    assert mine[0].data["priority"] == 8
    assert [e.attempt for e in mine if e.kind == "started"] == [1, 2]
    assert mine[2].data["error_class"] == "RuntimeError"
    assert mine[3].data["reason"] == "due"
    assert mine[1].data["queue_wait"] >= 0
    assert mine[5].data["runtime"] >= 0


def test_cancel_and_delay_are_announced(heard: list[JobEvent]) -> None:
    from tests.e2e_tasks import record

    handle = record.apply_async(kwargs={"label": "b"}, countdown=60)
    assert app.ledger.cancel(handle.id) == "cancelled"
    assert app.ledger.cancel(handle.id) == "final"
    kinds = [e.kind for e in heard if e.job_id == handle.id]
    assert kinds == ["scheduled", "cancelled"]


def test_a_failing_listener_never_reaches_the_job(heard: list[JobEvent]) -> None:
    from tests.e2e_tasks import record

    def broken(event: JobEvent) -> None:
        raise RuntimeError("listener bug")

    app.lifecycle.connect(broken)
    try:
        handle = record.apply_async(kwargs={"label": "c"})
    finally:
        app.lifecycle.disconnect(broken)
    assert [e.kind for e in heard if e.job_id == handle.id] == ["queued"]


def test_a_job_claimed_with_its_batch_waited_until_it_starts(heard: list[JobEvent]) -> None:
    """``started`` of a job the batched mode claimed with its batch: announced when the job
    starts (``batched.child.take``), its queue wait counted until then, not until the batch's
    claim."""
    from dataclasses import replace

    from synth_workers.batched import child
    from synth_workers.platform import platform_of
    from tests.e2e_tasks import record

    handle = record.apply_async(kwargs={"label": "c"})
    claim = app.ledger.claim(handle.id, "test-owner")
    assert claim is not None
    # as if it had been enqueued 90 s ago and claimed with its batch 60 s ago
    now = time.time()
    batch_claim = replace(claim, enqueued_at=now - 90, claimed_at=now - 60)
    child._local.claims[handle.id] = batch_claim
    seen = len(heard)
    assert child.take(platform_of(app), handle.id) is batch_claim
    assert handle.id not in child._local.claims
    started = [e for e in heard[seen:] if e.job_id == handle.id and e.kind == "started"]
    assert len(started) == 1
    assert started[0].attempt == claim.attempt
    assert 90 <= started[0].data["queue_wait"] <= time.time() - now + 90
    assert app.ledger.succeed(claim, None)
