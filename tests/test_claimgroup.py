"""Group claim (synth_workers.ledger.claimgroup): a threads pool's concurrent claims as one
statement, each job getting what the single claim would have given it. Real Postgres."""

from __future__ import annotations

import threading
from typing import Any

from synth_workers import app, enqueue
from synth_workers.ledger.claimgroup import ClaimGroup
from synth_workers.ledger.rows import Claim

from .conftest import wait_until, waits_on_a_lock

TASK = "tests.e2e_tasks.side_effect"


def _jobs(count: int, prefix: str) -> list[str]:
    return [enqueue(TASK, {"key": f"{prefix}{i}"}, queue="nobody").id for i in range(count)]


def _rows(ids: list[str]) -> dict[str, tuple[Any, ...]]:
    with app.ledger.connection() as conn:
        rows = conn.execute(
            "SELECT id::text, state, attempt, lease_owner, result FROM synth_jobs "
            "WHERE id = ANY(%s::uuid[])",
            (ids,),
        ).fetchall()
    return {r[0]: r[1:] for r in rows}


def _claim_together(
    group: ClaimGroup, items: list[tuple[str, str, list[tuple[Claim, Any]]]]
) -> list[Claim | BaseException | None]:
    """Every item claimed from a thread of its own, all released at once."""
    outcomes: list[Claim | BaseException | None] = [None] * len(items)
    start = threading.Barrier(len(items))

    def claim(index: int) -> None:
        job_id, owner, complete = items[index]
        start.wait()
        try:
            outcomes[index] = group.claim(job_id, owner, complete)
        except BaseException as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(items))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return outcomes


def test_concurrent_claims_share_statements_and_each_job_is_claimed_once(rclient: Any) -> None:
    ids = _jobs(40, "g")
    group = ClaimGroup(app.ledger)
    outcomes = _claim_together(group, [(i, "owner-g", []) for i in ids])
    assert not [o for o in outcomes if isinstance(o, BaseException)]
    claims = [o for o in outcomes if isinstance(o, Claim)]
    assert sorted(c.job_id for c in claims) == sorted(ids)
    assert {(c.attempt, c.owner, c.task, c.queue) for c in claims} == {
        (1, "owner-g", TASK, "nobody")
    }
    assert all(c.enqueued_at for c in claims)
    # fewer statements than jobs: the threads that came while one was on the wire went together
    assert group.calls < len(ids)
    assert set(_rows(ids).values()) == {("running", 1, "owner-g", None)}


def test_completions_ride_along_with_a_group_claim(rclient: Any) -> None:
    first, second = _jobs(8, "a"), _jobs(8, "b")
    group = ClaimGroup(app.ledger)
    done = _claim_together(group, [(i, "owner-c", []) for i in first])
    assert all(isinstance(c, Claim) for c in done)
    items = [
        (job_id, "owner-c", [(claim, {"n": n})])
        for n, (job_id, claim) in enumerate(zip(second, done, strict=True))
        if isinstance(claim, Claim)
    ]
    outcomes = _claim_together(group, items)
    assert all(isinstance(c, Claim) for c in outcomes)
    rows = _rows(first + second)
    assert {rows[i][:3] for i in second} == {("running", 1, "owner-c")}
    by_claim = {c.job_id: n for n, c in enumerate(done) if isinstance(c, Claim)}
    assert {i: rows[i][0] for i in first} == dict.fromkeys(first, "succeeded")
    assert {i: rows[i][3] for i in first} == {i: {"n": by_claim[i]} for i in first}


def test_a_row_the_group_skips_is_claimed_alone_as_the_single_claim_would(
    rclient: Any,
) -> None:
    """The group statement skips a row another transaction holds; the same turn then claims
    it alone, which waits for the lock as the single claim does. A job already running is
    refused, as by the single claim."""
    free, locked, running = _jobs(3, "s")
    assert app.ledger.claim(running, "someone-else") is not None
    group = ClaimGroup(app.ledger)
    items = [(job_id, "owner-s", []) for job_id in (free, locked, running)]
    result: list[list[Claim | Exception | None]] = []
    with app.ledger.connection() as holder, holder.transaction():
        holder.execute("SELECT 1 FROM synth_jobs WHERE id = %s FOR UPDATE", (locked,))
        turn = threading.Thread(target=lambda: result.append(group._claim(items)))
        turn.start()

        assert wait_until(waits_on_a_lock("UPDATE synth_jobs SET state%"), timeout=15)
        assert _rows([free])[free][:3] == ("running", 1, "owner-s")  # committed meanwhile
    turn.join(15)
    claimed_free, claimed_locked, refused = result[0]
    assert isinstance(claimed_free, Claim)
    assert isinstance(claimed_locked, Claim)
    assert (claimed_locked.job_id, claimed_locked.attempt) == (locked, 1)
    assert refused is None
    rows = _rows([free, locked, running])
    assert rows[locked][:3] == ("running", 1, "owner-s")
    assert rows[running][:3] == ("running", 1, "someone-else")


def test_two_deliveries_of_one_job_in_one_group_run_it_once(rclient: Any) -> None:
    first, other = _jobs(2, "d")
    group = ClaimGroup(app.ledger)
    items = [(first, "owner-d", []), (first, "owner-d", []), (other, "owner-d", [])]
    claimed, refused, claimed_other = group._claim(items)
    assert isinstance(claimed, Claim)
    assert claimed.job_id == first
    assert refused is None
    assert isinstance(claimed_other, Claim)
    assert claimed_other.job_id == other


def test_a_process_main_thread_claims_alone(rclient: Any) -> None:
    """A prefork or solo pool process runs its jobs on its main thread: never grouped."""
    (job_id,) = _jobs(1, "m")
    group = ClaimGroup(app.ledger)
    claim = group.claim(job_id, "owner-m")
    assert claim is not None
    assert claim.attempt == 1
    assert group.calls == 0
