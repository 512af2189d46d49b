"""A job someone waits on (``wait()``, ``AsyncResult.get()``) has its completion written at
once; the completions of jobs nobody waits on linger for the next claim to carry them
(``synth_workers.ledger.completer``). Real Postgres."""

from __future__ import annotations

import time
import uuid
from typing import Any

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


def test_a_waited_jobs_completion_skips_the_linger(
    rclient: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The linger made long: a completion nobody waits on stays unwritten through it, the
    # waited one is written at once by the completer's thread.
    monkeypatch.setattr(completer_module, "LINGER_SECONDS", 60.0)
    keeper = LeaseKeeper(app.ledger, lease_seconds=120)
    completer = Completer(app.ledger, keeper)
    try:
        plain = enqueue(TASK, {"key": "l1"}, queue="nobody")
        waited = enqueue(TASK, {"key": "l2"}, queue="nobody")
        mark_waited(app.ledger, [waited.id])
        plain_claim = app.ledger.claim(plain.id, keeper.owner)
        waited_claim = app.ledger.claim(waited.id, keeper.owner)
        assert plain_claim is not None
        assert waited_claim is not None
        keeper.add(plain.id)
        keeper.add(waited.id)
        completer.submit(plain_claim, "plain")
        time.sleep(0.5)
        assert plain.state() is JobState.RUNNING  # lingering for a next claim
        completer.submit(waited_claim, "waited")
        assert wait_until(lambda: waited.state() is JobState.SUCCEEDED, timeout=10)
        assert plain.state() is JobState.SUCCEEDED  # pending with it: one statement
        assert waited.info()["result"] == "waited"
    finally:
        completer.stop()
        keeper.stop()
