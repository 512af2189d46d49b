"""The platform's Redis transport keeps no ``unacked`` hash: the ledger's leases replace it.

Messages a worker took but has not started live in its memory only: a warm shutdown gives
them back to Redis, and a killed worker's are re-published by the ledger's reconciler.
Either way every job runs, and its effect happens once.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from tests.conftest import wait_until
from tests.e2e_tasks import effect

PREFETCH = {"SYNTH_WORKER_PREFETCH_MULTIPLIER": "4"}


def _states() -> dict[str, int]:
    from synth_workers import app

    with app.ledger.connection() as conn:
        rows = conn.execute("SELECT state, count(*) FROM synth_jobs GROUP BY state").fetchall()
    return {str(s): int(n) for s, n in rows}


def _effects() -> tuple[int, int]:
    from synth_workers import app

    with app.ledger.connection() as conn:
        done = conn.execute("SELECT count(*) FROM test_effects").fetchone()
        dup = conn.execute("SELECT count(*) FROM test_duplicates").fetchone()
    assert done is not None and dup is not None
    return int(done[0]), int(dup[0])


def _waiting(rclient: Any) -> int:
    from synth_workers.ledger.transport import priority_lists

    return sum(int(rclient.llen(key)) for key in priority_lists("default"))


def _waiting_ids(rclient: Any) -> set[str]:
    """Jobs with a message in Redis (the reconciler may have published a second copy of a
    job a worker took but had not started: its claim would be refused, it cannot run twice)."""
    from synth_workers.ledger.transport import _message_id, priority_lists

    return {
        str(_message_id(raw))
        for key in priority_lists("default")
        for raw in rclient.lrange(key, 0, -1)
    }


def _ids_in(state: str) -> set[str]:
    from synth_workers import app

    with app.ledger.connection() as conn:
        rows = conn.execute("SELECT id FROM synth_jobs WHERE state = %s", (state,)).fetchall()
    return {str(r[0]) for r in rows}


def test_warm_shutdown_gives_prefetched_jobs_back(rclient: Any, start_worker: Any) -> None:
    worker = start_worker("default", concurrency=1, env=PREFETCH)
    for n in range(5):
        effect.apply_async(kwargs={"n": n, "sleep": 1.5})
    # one running, three more taken into the worker's memory, one left in Redis
    assert wait_until(lambda: _states().get("running") == 1 and _waiting(rclient) == 1)
    assert rclient.hlen("unacked") == 0
    assert not rclient.exists("unacked_index")

    worker.process.send_signal(signal.SIGTERM)  # warm shutdown (the main process only)
    worker.process.wait(timeout=30)
    states = _states()
    assert states.get("running", 0) == 0
    assert states.get("succeeded") == 1  # the running job finished first
    assert states["queued"] == 4
    assert _waiting_ids(rclient) == _ids_in("queued")  # the others are back in Redis

    start_worker("default", concurrency=2)
    assert wait_until(lambda: _states() == {"succeeded": 5}, timeout=60), _states()
    assert _effects() == (5, 0)


def test_a_killed_workers_prefetched_jobs_are_republished(rclient: Any, start_worker: Any) -> None:
    worker = start_worker("default", concurrency=1, env=PREFETCH)
    for n in range(5):
        effect.apply_async(kwargs={"n": n, "sleep": 1.0})
    assert wait_until(lambda: _states().get("running") == 1 and _waiting(rclient) == 1)
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait(timeout=10)
    assert len(_waiting_ids(rclient)) < 4  # nothing gave the taken messages back

    # the running one comes back when its lease expires, the three taken but never
    # started when the reconciler finds them missing from Redis
    start_worker("default", concurrency=2)
    assert wait_until(lambda: _states() == {"succeeded": 5}, timeout=60), _states()
    assert _effects() == (5, 0)


def test_a_job_stopped_by_a_signal_to_its_process_is_requeued_not_dead(
    rclient: Any, start_worker: Any
) -> None:
    """SIGTERM to the whole process group (``kill -TERM -PGID``, a runtime without an init)
    interrupts the running job inside its pool process: it runs again, it is not dead."""
    worker = start_worker("default", concurrency=1)
    job = effect.apply_async(kwargs={"n": 1, "sleep": 3})
    assert wait_until(lambda: _states().get("running") == 1)
    os.killpg(worker.process.pid, signal.SIGTERM)
    worker.process.wait(timeout=30)
    assert "dead" not in _states()
    start_worker("default", concurrency=1)
    assert wait_until(lambda: _states() == {"succeeded": 1}, timeout=60), _states()
    assert _effects() == (1, 0)
    from synth_workers import app

    row = app.ledger.get(job.id)
    assert row is not None and row["attempt"] == 2


def _read_once(fill: bool, prefetch: int) -> list[int]:
    """One read of the ``default`` queue through the platform's transport, as a worker's
    consumer makes it; returns the ``n`` of each job delivered (here: its priority)."""
    from synth_workers import app
    from synth_workers.broker import FILL_OPTION

    got: list[int] = []
    with app.connection_for_read() as conn:
        conn.transport_options[FILL_OPTION] = fill
        queue = app.amqp.queues["default"]
        with conn.Consumer(queue, accept=["json"]) as consumer:
            consumer.register_callback(lambda body, message: got.append(body[1]["n"]))
            consumer.qos(prefetch_count=prefetch)
            conn.drain_events(timeout=5)
            # what was delivered but not run goes back to Redis when the channel closes
    return got


def test_a_read_fills_the_prefetch_window_in_priority_order(rclient: Any) -> None:
    from synth_workers import enqueue

    levels = [0, 5, 9, 3, 7, 1, 8, 2, 6, 4] * 2
    for level in levels:
        enqueue("tests.e2e_tasks.effect", {"n": level}, priority=level, queue="default")
    assert _waiting(rclient) == 20

    # kombu's own loop: one message per BRPOP
    assert _read_once(fill=False, prefetch=8) == [9]
    assert wait_until(lambda: _waiting(rclient) == 20)  # given back on close

    # filled: the BRPOP's message, then the window's 7 other slots in one round trip,
    # the most urgent first, exactly as the next seven BRPOPs would have taken them
    assert _read_once(fill=True, prefetch=8) == [9, 9, 8, 8, 7, 7, 6, 6]
    assert wait_until(lambda: _waiting(rclient) == 20)

    # never beyond the window, whatever is waiting
    assert _read_once(fill=True, prefetch=3) == [9, 9, 8]
    assert _read_once(fill=True, prefetch=1) == [9]


def test_only_a_pool_that_starts_jobs_on_hand_over_fills_its_window(
    rclient: Any, start_worker: Any
) -> None:
    """A threads worker takes its whole window per read; prefork keeps one message per BRPOP
    (its hand-over to a pool process waits for the event loop, so an extra round trip would
    delay the job's start), and so does solo (it runs each job inside the read). All run
    every job once."""
    from synth_workers import app

    env = {"SYNTH_WORKER_PREFETCH_MULTIPLIER": "5"}
    for pool, concurrency in (("threads", 8), ("prefork", 2), ("solo", 1)):
        stats = rclient.info("commandstats")
        before = stats.get("cmdstat_brpop", {}).get("calls", 0)
        for n in range(40):
            effect.apply_async(kwargs={"n": n, "sleep": 0.05})
        worker = start_worker("default", pool=pool, concurrency=concurrency, env=env)
        assert wait_until(lambda: _states() == {"succeeded": 40}, timeout=60), _states()
        worker.stop()
        brpops = rclient.info("commandstats")["cmdstat_brpop"]["calls"] - before
        # threads (window 40): the first read takes every job; then only the idle BRPOPs
        # (one a second) until the worker stops. prefork (window 10) and solo (window 5,
        # each job run inside its read): a BRPOP per job.
        assert (brpops <= 10) if pool == "threads" else (brpops >= 40), (pool, brpops)
        assert _effects() == (40, 0)
        with app.ledger.connection() as conn:
            conn.execute("TRUNCATE synth_jobs, test_effects, test_duplicates")
