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
