"""The batched consumption mode (``SYNTH_WORKER_MODE=batched``, ``synth_workers.batched``):
one ledger claim statement per batch, strict priorities within the documented window, and
no job run twice nor wrongly dead-lettered when a pool process dies mid-batch. Real worker
processes, real Redis and Postgres. (The guarantee tests run in this mode too: ``.ci/run``.)
"""

from __future__ import annotations

import json
import signal
from typing import Any

import psutil

from synth_workers import JobState, app, enqueue, enqueue_many
from synth_workers.batched import ALONE_HEADER
from synth_workers.broker import message_id

from .conftest import wait_until

QUEUE = "batched"


def _env(size: int) -> dict[str, str]:
    return {"SYNTH_WORKER_MODE": "batched", "SYNTH_BATCH_SIZE": str(size)}


def _rows(query: str) -> list[Any]:
    with app.ledger.connection() as conn:
        return conn.execute(query).fetchall()


def _states() -> dict[str, int]:
    return dict(_rows("SELECT state, count(*) FROM synth_jobs GROUP BY state"))


def _order(rclient: Any) -> list[str]:
    return [x.decode() for x in rclient.lrange("test:order", 0, -1)]


def test_a_batch_is_claimed_in_one_statement(rclient: Any, start_worker: Any) -> None:
    total, size = 64, 16
    handles = [
        enqueue("tests.e2e_tasks.record", {"label": f"j{i}"}, queue=QUEUE) for i in range(total)
    ]
    start_worker(QUEUE, concurrency=1, env=_env(size))
    assert wait_until(lambda: _states() == {"succeeded": total}, timeout=60), _states()
    # now() is the statement's transaction time: one claim statement, one started_at
    groups = [int(n) for (n,) in _rows("SELECT count(*) FROM synth_jobs GROUP BY started_at")]
    assert max(groups) <= size
    assert len(groups) <= total // size + 2, groups  # one job per claim would give 64
    assert sum(groups) == total
    assert sorted(_order(rclient)) == sorted(f"j{i}" for i in range(total))
    # results stay readable through Celery's AsyncResult
    assert handles[0].wait(timeout=10) == "j0"
    assert app.AsyncResult(handles[-1].id).get(timeout=10) == f"j{total - 1}"


def test_a_batch_runs_in_priority_order(rclient: Any, start_worker: Any) -> None:
    levels = ["low", "normal", "high"]
    for i in range(10):
        for level in levels:
            enqueue("tests.e2e_tasks.record", {"label": f"{level}{i}"}, queue=QUEUE, priority=level)
    start_worker(QUEUE, concurrency=1, env=_env(32))  # all 30 in one fetch
    assert wait_until(lambda: rclient.llen("test:order") == 30, timeout=60)
    expected = [f"{level}{i}" for level in reversed(levels) for i in range(10)]
    assert _order(rclient) == expected


def test_a_higher_priority_job_waits_at_most_one_batch(rclient: Any, start_worker: Any) -> None:
    """The window: a job enqueued while a backlog drains starts after at most N (the batch
    size) lower-priority jobs that had not started when it was enqueued (one pool process,
    prefetch 1)."""
    total, size = 2000, 8
    # The worker is up first and the backlog comes in one bulk call: a backlog enqueued
    # before the worker started could be gone (thousands of jobs/s) before it answers a ping.
    start_worker(QUEUE, concurrency=1, env=_env(size))
    low = [{"label": f"low{i}"} for i in range(total)]
    enqueue_many("tests.e2e_tasks.record", low, queue=QUEUE, priority="low")
    assert wait_until(lambda: rclient.llen("test:order") >= 2 * size, timeout=60, interval=0.005)
    enqueue("tests.e2e_tasks.record", {"label": "HIGH"}, queue=QUEUE, priority="high")
    started_before = int(rclient.llen("test:order"))
    assert wait_until(lambda: rclient.llen("test:order") == total + 1, timeout=120)
    order = _order(rclient)
    assert started_before < total - size, "the backlog was gone before the high job came"
    ahead = order.index("HIGH") - started_before
    assert 0 <= ahead <= size, (ahead, started_before)


def test_sigkill_mid_batch_runs_no_effect_twice(rclient: Any, start_worker: Any) -> None:
    # about 12 s of work for two pool processes: a kill that lands between two batches (it
    # loses nothing) leaves time for another look and kill
    total = 1200
    enqueue_many("tests.e2e_tasks.effect", [{"n": n, "sleep": 0.02} for n in range(total)],
                 queue=QUEUE)  # fmt: skip
    worker = start_worker(QUEUE, concurrency=2, env=_env(16))

    def lost() -> int:
        query = "SELECT count(*) FROM synth_jobs WHERE error_class = 'WorkerLostError'"
        return int(_rows(query)[0][0])

    def holder() -> psutil.Process | None:
        """A pool process holding claimed jobs of its batch (lease owner ``host:pid:boot``)."""
        owners = _rows("SELECT DISTINCT lease_owner FROM synth_jobs WHERE state = 'running'")
        held = {int(owner.split(":")[1]) for (owner,) in owners if owner}
        for child in psutil.Process(worker.process.pid).children():
            if child.pid in held:
                return child
        return None

    assert wait_until(lambda: _states().get("succeeded", 0) >= 60, timeout=60)
    for _ in range(5):  # the batch may end between the look and the kill: then again
        found = wait_until(lambda: holder() is not None, timeout=30, interval=0.005)
        assert found, (_states(), worker.output()[-4000:])
        child = holder()
        if child is None:
            continue
        child.send_signal(signal.SIGKILL)  # a pool process, mid-batch
        if wait_until(lambda: lost() >= 1, timeout=3):
            break
    assert wait_until(lambda: _states() == {"succeeded": total}, timeout=120), _states()
    effects = _rows("SELECT count(*), count(DISTINCT job_id) FROM test_effects")[0]
    assert tuple(effects) == (total, total)
    assert _rows("SELECT count(*) FROM test_duplicates")[0][0] == 0
    # the lost batch went back to the queue without counting a worker loss against its jobs
    assert lost() >= 1
    assert _rows("SELECT max(worker_losses) FROM synth_jobs")[0][0] == 0


def test_a_poison_pill_in_a_batch_kills_alone(rclient: Any, start_worker: Any) -> None:
    """A job that kills its pool process is dead-lettered after 3 losses as in the default
    mode; its batch-mates are run again alone and succeed, with no loss counted."""
    mates = [
        enqueue("tests.e2e_tasks.side_effect", {"key": f"m{i}"}, queue=QUEUE) for i in range(4)
    ]
    pill = enqueue("tests.e2e_tasks.suicide", {"key": "pill"}, queue=QUEUE)
    mates += [
        enqueue("tests.e2e_tasks.side_effect", {"key": f"m{i}"}, queue=QUEUE) for i in range(4, 8)
    ]
    start_worker(QUEUE, concurrency=1, env=_env(16))
    assert wait_until(lambda: pill.state() is JobState.DEAD, timeout=90), pill.info()
    info = pill.info()
    assert info["failure_class"] == "poison_pill"
    assert info["worker_losses"] == 3
    # each loss counted once, by the main process as the pool process died or, on a machine
    # busy enough for the lease to lapse first, by the reaper: either way the ledger keeps the
    # "run alone" mark (failure_class worker_lost), so the count of runs below holds. How fast
    # the main process hears of a death is tests/test_poolwatch.py's.
    assert info["error_class"] in ("WorkerLostError", "LeaseExpired"), info
    # one run in the batch (not counted), then three alone
    assert int(rclient.get("test:count:pill") or 0) == 4
    assert wait_until(lambda: all(h.state() is JobState.SUCCEEDED for h in mates), timeout=60)
    assert all(h.info()["worker_losses"] == 0 for h in mates)


def _waiting(rclient: Any, queue: str) -> dict[str, dict[str, Any]]:
    """The messages waiting in ``queue``'s Redis lists, by job id."""
    from synth_workers.ledger.transport import priority_lists

    found = {}
    for key in priority_lists(queue):
        for raw in rclient.lrange(key, 0, -1):
            found[message_id(raw)] = json.loads(raw)
    return found


def test_a_job_lost_in_a_batch_is_sent_again_marked_alone_by_the_ledger(
    rclient: Any, start_worker: Any
) -> None:
    """The "run alone" mark does not live in the requeued message only: a lost batch's job
    that the ledger publishes again is marked too. Here the reconciler does it (the requeued
    message waited in a busy worker's memory past ``SYNTH_RECONCILE_GRACE``: a clean-clone
    run saw the pill share a batch again that way and run 5 times, not 4). Each of the
    pill's runs is then alone and counted; its mates never share its batch."""
    from synth_workers.ledger.sweeper import Sweeper
    from synth_workers.ledger.transport import priority_lists

    pill = enqueue("tests.e2e_tasks.suicide", {"key": "pill"}, queue=QUEUE)
    mates = [
        enqueue("tests.e2e_tasks.side_effect", {"key": f"m{i}"}, queue=QUEUE) for i in range(4)
    ]
    # what lost_batch leaves: queued, its worker loss not counted; its message gone from
    # Redis (a worker holds it) for longer than the grace
    with app.ledger.connection() as conn:
        conn.execute(
            "UPDATE synth_jobs SET failure_class = 'worker_lost', error_class = "
            "'WorkerLostError', published_at = now() - interval '1 minute' WHERE id = %s",
            (pill.id,),
        )
    for key in priority_lists(QUEUE):
        for raw in rclient.lrange(key, 0, -1):
            if message_id(raw) == pill.id:
                rclient.lrem(key, 0, raw)
    assert pill.id not in _waiting(rclient, QUEUE)
    now = [1000.0]
    sweeper = Sweeper(app, clock=lambda: now[0])
    assert sweeper.reconcile() == 0  # missing from Redis at two looks a grace apart
    now[0] += app.settings.reconcile_grace
    assert sweeper.reconcile() == 1
    waiting = _waiting(rclient, QUEUE)
    assert waiting[pill.id]["headers"].get(ALONE_HEADER) is True
    assert not any(waiting[h.id]["headers"].get(ALONE_HEADER) for h in mates)
    # one fetch takes all five; the pill goes to the pool alone
    start_worker(QUEUE, concurrency=1, env=_env(16))
    assert wait_until(lambda: pill.state() is JobState.DEAD, timeout=90), pill.info()
    assert pill.info()["worker_losses"] == 3
    assert int(rclient.get("test:count:pill") or 0) == 3  # every run counted
    assert wait_until(lambda: all(h.state() is JobState.SUCCEEDED for h in mates), timeout=60)
    assert all(h.info()["worker_losses"] == 0 for h in mates)
    assert all(int(rclient.get(f"test:count:m{i}") or 0) == 1 for i in range(4))


def test_a_reaped_job_is_sent_again_marked_alone(rclient: Any) -> None:
    """A job whose lease lapsed (its worker or pool process died) is published again marked
    to run alone; a job merely re-published is not."""
    lost = enqueue("tests.e2e_tasks.side_effect", {"key": "lost"}, queue="nobody")
    plain = enqueue("tests.e2e_tasks.side_effect", {"key": "plain"}, queue="nobody")
    assert app.ledger.claim(lost.id, "host:1:") is not None
    with app.ledger.connection() as conn:
        conn.execute(
            "UPDATE synth_jobs SET lease_expires_at = now() - interval '1 minute' WHERE id = %s",
            (lost.id,),
        )
        conn.execute(
            "UPDATE synth_jobs SET published_at = now() - interval '1 minute' WHERE id = %s",
            (plain.id,),
        )
    requeued, poisoned = app.ledger.reap_expired()
    assert poisoned == 0
    assert [(j.id, j.alone) for j in requeued] == [(lost.id, True)]
    assert [(j.id, j.alone) for j in app.ledger.stale_queued(30)] == [(plain.id, False)]


def test_a_job_cancelled_after_its_batch_was_claimed_never_runs(
    rclient: Any, start_worker: Any
) -> None:
    """Cancel-at-claim holds for a job claimed with its batch but not started yet: the
    worker hears of the cancel by its lease renewal and ends the job at its start."""
    first = enqueue("tests.e2e_tasks.long_running", {"key": "lr", "seconds": 3}, queue=QUEUE)
    waiting = enqueue("tests.e2e_tasks.record", {"label": "after"}, queue=QUEUE)
    start_worker(QUEUE, concurrency=1, env=_env(16))  # both in one batch
    assert wait_until(lambda: rclient.get("test:started:lr") is not None, timeout=30)
    assert waiting.info()["state"] == "running"  # claimed with the batch
    assert waiting.cancel() is False  # claimed: asked, not yet ended
    assert first.wait(timeout=30) == "finished"
    assert wait_until(lambda: waiting.state() is JobState.CANCELLED, timeout=10)
    assert rclient.lrange("test:order", 0, -1) == []
