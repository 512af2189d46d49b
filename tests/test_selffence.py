"""Self-fencing's rules, on a clock the test drives, and the reaper's grace on a real ledger
(the end-to-end partition is tests/test_hosts.py)."""

from __future__ import annotations

import threading
from typing import Any

from synth_workers import JobState, app, enqueue
from synth_workers.selffence import Fence

LEASE = 6.0


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_job_is_fenced_when_its_lease_runs_out_on_the_workers_clock() -> None:
    clock = Clock()
    fence = Fence(LEASE, clock)
    fence.claimed("a", sent_at=100.0)
    clock.now = 105.9
    assert not fence.fenced("a")
    clock.now = 106.0  # the claim was sent at 100: the lease may be over now
    assert fence.fenced("a")
    fence.forget("a")
    assert not fence.fenced("a")  # a job no longer here is nobody's concern


def test_a_renewal_extends_the_lease_from_when_it_was_sent() -> None:
    clock = Clock()
    fence = Fence(LEASE, clock)
    fence.claimed("a", sent_at=100.0)
    fence.renewing(sent_at=104.0)
    clock.now = 109.0  # the answer came late: the lease runs from 104, not from 109
    fence.renewed(sent_at=104.0, held=["a"], asked=["a"])
    clock.now = 109.9
    assert not fence.fenced("a")
    clock.now = 110.0
    assert fence.fenced("a")


def test_a_job_the_renewal_did_not_return_is_lost_at_once() -> None:
    clock = Clock()
    fence = Fence(LEASE, clock)
    fence.claimed("a", sent_at=100.0)
    fence.claimed("b", sent_at=100.0)
    fence.claimed("c", sent_at=101.0)  # claimed after the renewal was sent: not asked
    fence.renewed(sent_at=100.5, held=["a"], asked=["a", "b"])
    assert not fence.fenced("a")
    assert fence.fenced("b")  # reaped and taken by another worker meanwhile
    assert not fence.fenced("c")


def test_cut_off_only_after_failed_renewals_for_a_whole_lease() -> None:
    clock = Clock()
    fence = Fence(LEASE, clock)
    fence.claimed("a", sent_at=100.0)
    clock.now = 200.0
    assert not fence.cut_off  # idle for long, but nothing failed
    fence.renewing(sent_at=200.0)  # outstanding (hanging) or failed since
    assert fence.cut_off  # last answer at 100
    assert not fence.wait_reachable(0.0)
    fence.renewed(sent_at=201.0, held=[], asked=[])
    assert not fence.cut_off
    assert fence.wait_reachable(0.0)


def test_wait_reachable_returns_when_the_ledger_answers() -> None:
    clock = Clock()
    fence = Fence(LEASE, clock)
    clock.now = 200.0
    fence.renewing(sent_at=200.0)
    assert fence.cut_off
    answered = threading.Timer(0.2, lambda: fence.renewed(200.0, [], []))
    answered.start()
    try:
        assert fence.wait_reachable(30.0)  # the test's clock stands still: only the answer ends it
    finally:
        answered.cancel()


def _set(job_id: str, sql: str) -> None:
    with app.ledger.connection() as conn:
        conn.execute(f"UPDATE synth_jobs SET {sql} WHERE id = %s", (job_id,))


def test_the_reaper_waits_the_grace_past_a_lease(rclient: Any) -> None:
    grace = app.settings.reap_grace
    assert grace > 0
    h = enqueue("tests.e2e_tasks.side_effect", {"key": "grace"}, queue="nobody")
    assert app.ledger.claim(h.id, "cut-off-worker") is not None
    # Expired, but within the grace: its owner may still be stopping it.
    _set(h.id, f"lease_expires_at = now() - make_interval(secs => {grace / 2})")
    requeued, _ = app.ledger.reap_expired()
    assert h.id not in {job.id for job in requeued}
    assert h.state() is JobState.RUNNING
    _set(h.id, f"lease_expires_at = now() - make_interval(secs => {grace + 1})")
    requeued, _ = app.ledger.reap_expired()
    assert h.id in {job.id for job in requeued}
    assert h.state() is JobState.QUEUED
