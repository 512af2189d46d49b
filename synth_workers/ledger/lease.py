"""Lease renewal: one statement per worker process per tick, for all the jobs it runs.

Each process that runs jobs has one :class:`LeaseKeeper` (made after fork) whose owner id is
``host:pid:boot``. Its thread renews every lease the owner holds every third of
``SYNTH_LEASE_SECONDS`` and learns which of its jobs were asked to cancel. A frozen process
(SIGSTOP) stops renewing, so its leases expire and the reaper hands the jobs to others. A
job stays in the keeper until its completion is written (see ``completer``), so its lease
holds through a completion write that is being retried. :meth:`LeaseKeeper.stop` ends the
thread (worker process shutdown).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from synth_workers.ledger.store import Ledger

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, ledger: Ledger, lease_seconds: float) -> None:
        self.ledger = ledger
        self.interval = max(0.05, lease_seconds / 3)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.pid = os.getpid()
        self._active: dict[str, int] = {}
        self._cancel_requested: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def add(self, job_id: str) -> None:
        with self._lock:
            self._active[job_id] = self._active.get(job_id, 0) + 1
            if self._thread is None and not self._stop.is_set():
                self._thread = threading.Thread(
                    target=self._run, name="synth-lease-keeper", daemon=True
                )
                self._thread.start()

    def remove(self, job_id: str) -> None:
        with self._lock:
            left = self._active.get(job_id, 0) - 1
            if left <= 0:
                self._active.pop(job_id, None)
                self._cancel_requested.discard(job_id)
            else:
                self._active[job_id] = left

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancel_requested

    def stop(self, timeout: float = 5.0) -> None:
        """End the renewal thread; the leases it held lapse (the reaper takes the jobs)."""
        self._stop.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                if not self._active:
                    continue
            try:
                renewed = self.ledger.renew(self.owner)
            except Exception:  # keep renewing through a Postgres blip
                log.exception("lease renewal failed")
                continue
            with self._lock:
                self._cancel_requested |= {job for job, asked in renewed if asked}
