"""A job someone waits on (``wait()``, ``AsyncResult.get()``) has its completion written at
once; the completions of jobs nobody waits on linger for the next claim to carry them
(``synth_workers.ledger.completer``). Real Postgres."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest

from synth_workers import JobState, app, enqueue
from synth_workers.ledger import LeaseKeeper
from synth_workers.ledger import completer as completer_module
from synth_workers.ledger.completer import Completer
from synth_workers.ledger.results import mark_waited

from .conftest import wait_until

TASK = "tests.e2e_tasks.side_effect"


def test_the_claim_says_whether_someone_waits_on_the_job(rclient: Any) -> None:
    waited = enqueue(TASK, {"key": "w1"}, queue="nobody")
    plain = enqueue(TASK, {"key": "w2"}, queue="nobody")
    # a caller-given id: the row may be waited on (maybe_waited), but nobody is yet
    given = enqueue(TASK, {"key": "w3"}, queue="nobody", job_id=str(uuid.uuid4()))
    mark_waited(app.ledger, [waited.id])
    claims = {h.id: app.ledger.claim(h.id, "owner-w") for h in (waited, plain, given)}
    assert {job_id: c.waited for job_id, c in claims.items() if c is not None} == {
        waited.id: True,
        plain.id: False,
        given.id: False,
    }


def test_a_batch_claim_says_it_too(rclient: Any) -> None:
    from synth_workers.ledger.batchclaim import claim_many

    waited, plain = (enqueue(TASK, {"key": f"b{i}"}, queue="nobody") for i in range(2))
    mark_waited(app.ledger, [waited.id])
    claims = claim_many(app.ledger, [waited.id, plain.id], "owner-b")
    assert {c.job_id: c.waited for c in claims} == {waited.id: True, plain.id: False}


@contextmanager
def _running(ledger: Any = None) -> Iterator[tuple[LeaseKeeper, Completer]]:
    """A lease keeper and a completer (writing to ``ledger``, else the app's), stopped after."""
    keeper = LeaseKeeper(app.ledger, lease_seconds=120)
    completer = Completer(ledger if ledger is not None else app.ledger, keeper)
    try:
        yield keeper, completer
    finally:
        completer.stop()
        keeper.stop()


def _claimed(keeper: LeaseKeeper, key: str, waited: bool = False) -> tuple[Any, Any]:
    handle = enqueue(TASK, {"key": key}, queue="nobody")
    if waited:
        mark_waited(app.ledger, [handle.id])
    claim = app.ledger.claim(handle.id, keeper.owner)
    assert claim is not None
    assert claim.waited is waited
    keeper.add(handle.id)
    return handle, claim


def test_the_linger_is_kept_only_while_claims_carry_completions(
    rclient: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The linger made long. An idle process (no claim carried its completions, no other job
    # running) writes a completion at once; while another job runs, or once a claim comes
    # within a linger of a completion (a backlog), the next completions linger for the next
    # claim, except one someone waits on.
    monkeypatch.setattr(completer_module, "LINGER_SECONDS", 60.0)
    with _running() as (keeper, completer):
        idle, idle_claim = _claimed(keeper, "i1")
        completer.submit(idle_claim, "idle")
        assert wait_until(lambda: idle.state() is JobState.SUCCEEDED, timeout=10)

        # another job of the process still runs (a threads pool): a burst may follow
        first, first_claim = _claimed(keeper, "c1")
        running, _ = _claimed(keeper, "c2")
        completer.submit(first_claim, "first")
        time.sleep(0.5)
        assert first.state() is JobState.RUNNING
        carried = completer.take()  # the next claim, at once: it carries the completion
        assert completer.write(carried)
        assert first.state() is JobState.SUCCEEDED
        assert running.state() is JobState.RUNNING

        plain, plain_claim = _claimed(keeper, "l1")
        completer.submit(plain_claim, "plain")
        time.sleep(0.5)
        assert plain.state() is JobState.RUNNING  # lingering for a next claim

        waited, waited_claim = _claimed(keeper, "l2", waited=True)
        completer.submit(waited_claim, "waited")
        assert wait_until(lambda: waited.state() is JobState.SUCCEEDED, timeout=10)
        assert plain.state() is JobState.SUCCEEDED  # pending with it: one statement
        assert waited.info()["result"] == "waited"


def test_in_a_backlog_every_completion_rides_with_the_next_claim(
    rclient: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A prefork process draining a backlog: a job ends, the next claim comes a moment later
    # and carries its completion. The thread, woken by each completion, must not write the
    # one pending when a linger that began at an earlier completion runs out: the linger
    # counts from the pending completion's own submit.
    monkeypatch.setattr(completer_module, "LINGER_SECONDS", 0.1)
    by_thread: list[int] = []
    succeed_many = app.ledger.succeed_many

    def counted(done: Any) -> Any:
        if threading.current_thread().name == "synth-completer":
            by_thread.append(len(done))
        return succeed_many(done)

    monkeypatch.setattr(app.ledger, "succeed_many", counted)
    handles = []
    with _running() as (keeper, completer):
        for i in range(30):
            handle, claim = _claimed(keeper, f"d{i}")
            handles.append(handle)
            completer.submit(claim, i)
            time.sleep(0.02)  # the worker's way to its next message
            assert completer.write(completer.take())  # the next claim carries it
        assert all(h.state() is JobState.SUCCEEDED for h in handles)
        # the first completion came to an idle process: written at once, by the thread
        assert sum(by_thread) <= 2, by_thread


def test_a_refused_completion_statement_is_tried_statement_tries_times_in_all(
    rclient: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A statement error (a bug, not an outage) is given up after STATEMENT_TRIES tries, the
    # thread's first one included; the job's lease then lapses and the reaper takes it back.
    monkeypatch.setattr(completer_module, "RETRY_FIRST", 0.01)
    tries: list[int] = []

    class Refusing:
        """The completion statement refused by Postgres for a reason of its own."""

        def succeed_many(self, done: Any) -> None:
            tries.append(len(done))
            raise psycopg.errors.DatatypeMismatch("refused")

    with _running(Refusing()) as (keeper, completer):
        handle, claim = _claimed(keeper, "r1")
        completer.submit(claim, "refused")  # an idle process: the thread writes it at once
        assert wait_until(lambda: bool(tries), timeout=10)
        assert completer.flush(timeout=10)  # given up: nothing left for the thread
        assert tries == [1] * completer_module.STATEMENT_TRIES
        assert keeper.held == 0  # its lease is no longer renewed
        assert handle.state() is JobState.RUNNING
