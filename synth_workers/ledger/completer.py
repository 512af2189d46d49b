"""Batched completions: a worker process hands finished jobs to a thread that completes
them in one fenced statement per batch, while the next job already runs.

A job's lease keeps being renewed until its completion is written; if the process dies
before that, the lease expires and the job runs again (at least once; effects written with
``effect_transaction`` still happen exactly once).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synth_workers.ledger.lease import LeaseKeeper
    from synth_workers.ledger.store import Claim, Ledger

log = logging.getLogger(__name__)
MAX_BATCH = 500


class Completer:
    def __init__(self, ledger: Ledger, keeper: LeaseKeeper) -> None:
        self.ledger = ledger
        self.keeper = keeper
        self._queue: queue.Queue[tuple[Claim, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="synth-completer", daemon=True)
        self._thread.start()

    def submit(self, claim: Claim, result: Any) -> None:
        self._queue.put((claim, result))

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything submitted so far is written (shutdown, tests)."""
        done = threading.Event()
        self._queue.put((None, done))  # type: ignore[arg-type]
        done.wait(timeout)

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            markers = [item[1] for item in batch if item[0] is None]
            jobs = [item for item in batch if item[0] is not None]
            for attempt in range(3):
                try:
                    self.ledger.succeed_many(jobs)
                    break
                except Exception:
                    log.exception("writing %d completions failed (try %d)", len(jobs), attempt + 1)
            for claim, _ in jobs:
                self.keeper.remove(claim.job_id)
            for marker in markers:
                marker.set()
