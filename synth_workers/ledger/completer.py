"""Deferred completions: a worker process's finished jobs are completed in the same
statement that claims its next job (one round trip per job), or by a thread after a short
linger when no next job comes.

A job's lease keeps being renewed until its completion is written; if the process dies
before that, the lease expires and the job runs again (at least once; effects written with
``effect_transaction`` still happen exactly once).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synth_workers.ledger.lease import LeaseKeeper
    from synth_workers.ledger.store import Claim, Ledger

log = logging.getLogger(__name__)
LINGER_SECONDS = 0.02
MAX_PENDING = 200


class Completer:
    def __init__(self, ledger: Ledger, keeper: LeaseKeeper) -> None:
        self.ledger = ledger
        self.keeper = keeper
        self._pending: list[tuple[Claim, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="synth-completer", daemon=True)
        self._thread.start()

    def submit(self, claim: Claim, result: Any) -> None:
        with self._lock:
            self._pending.append((claim, result))
            self._idle.clear()
            full = len(self._pending) >= MAX_PENDING
        self._wake.set()
        if full:
            self.write(self.take())

    def take(self) -> list[tuple[Claim, Any]]:
        """Hand over every pending completion (the caller writes them)."""
        with self._lock:
            taken, self._pending = self._pending, []
        return taken

    def written(self, done: list[tuple[Claim, Any]]) -> None:
        """Completions handed over by :meth:`take` are now written (or refused)."""
        for claim, _ in done:
            self.keeper.remove(claim.job_id)
        with self._lock:
            if not self._pending:
                self._idle.set()

    def write(self, done: list[tuple[Claim, Any]]) -> None:
        for attempt in range(3):
            try:
                self.ledger.succeed_many(done)
                break
            except Exception:
                log.exception("writing %d completions failed (try %d)", len(done), attempt + 1)
        self.written(done)

    def flush(self, timeout: float = 10.0) -> None:
        """Write everything pending now (shutdown, tests)."""
        self.write(self.take())
        self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            # Give the next claim the chance to carry these; write them if none comes.
            time.sleep(LINGER_SECONDS)
            done = self.take()
            if done:
                self.write(done)
