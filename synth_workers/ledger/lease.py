"""Lease renewal: one statement per worker process per tick, for all the jobs it runs.

Each process that runs jobs has one :class:`LeaseKeeper` (made after fork) whose owner id is
``host:pid:boot``. Its thread renews the leases of the jobs it runs every third of
``SYNTH_LEASE_SECONDS`` and learns which of them were asked to cancel. A frozen process
(SIGSTOP) stops renewing, so its leases expire and the reaper hands the jobs to others. A
job stays in the keeper until its completion is written (see ``completer``), so its lease
holds through a completion write that is being retried. :meth:`LeaseKeeper.stop` ends the
thread (worker process shutdown).

A process cut off from Postgres cannot renew: its :class:`~synth_workers.selffence.Fence`
tells each job when its lease is over on this process's clock, so the job stops before the
reaper gives it to another worker (``synth_workers.selffence``). Only the jobs in the keeper
are renewed (by id), so a job that stopped that way is not kept alive when the ledger is
reachable again: its lease lapses and the reaper takes it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING

from synth_workers.selffence import Fence

if TYPE_CHECKING:
    from synth_workers.ledger.store import Ledger

log = logging.getLogger(__name__)


class LeaseKeeper:
    def __init__(self, ledger: Ledger, lease_seconds: float) -> None:
        self.ledger = ledger
        self.interval = max(0.05, lease_seconds / 3)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.pid = os.getpid()
        #: Each running job's lease as this process knows it (self-fencing).
        self.fence = Fence(lease_seconds)
        self._active: dict[str, int] = {}
        self._cancel_requested: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def add(self, job_id: str, since: float | None = None) -> None:
        """``job_id`` was claimed by a statement sent at ``since`` (``time.monotonic()``;
        now when omitted): renew its lease from now on."""
        self.fence.claimed(job_id, time.monotonic() if since is None else since)
        with self._lock:
            self._active[job_id] = self._active.get(job_id, 0) + 1
            self._start_thread()

    @property
    def held(self) -> int:
        """How many jobs this process holds a lease on (running, or their completion not
        written yet)."""
        return len(self._active)

    def _start_thread(self) -> None:
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
                self.fence.forget(job_id)
            else:
                self._active[job_id] = left

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancel_requested

    def fenced(self, job_id: str) -> bool:
        """Whether ``job_id`` must stop: its lease ran out unrenewed, or another holds it."""
        return self.fence.fenced(job_id)

    def before_claim(self) -> float:
        """Called before a claim is sent: while this process is cut off from the ledger,
        wait (up to a lease; the keeper probes the ledger meanwhile) so that a worker which
        cannot renew starts no job. Returns the time (``time.monotonic()``) from which the
        claim's lease surely runs, for :meth:`add`."""
        if self.fence.cut_off:
            log.warning("cut off from the ledger: waiting for it before starting a job")
            with self._lock:
                self._start_thread()
            self.fence.wait_reachable(self.fence.lease)
        return time.monotonic()

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
                jobs = list(self._active)
            # With nothing to renew, the ledger is asked only while the process is cut off
            # (an empty renewal: is it reachable again?).
            if not jobs and not self.fence.cut_off:
                continue
            sent = time.monotonic()
            self.fence.renewing(sent)
            try:
                renewed = self.ledger.renew(self.owner, jobs)
            except Exception:  # keep renewing through a Postgres blip
                log.exception("lease renewal failed")
                continue
            self.fence.renewed(sent, (job for job, _ in renewed), jobs)
            with self._lock:
                self._cancel_requested |= {job for job, asked in renewed if asked}
