"""Self-fencing: a worker process cut off from the ledger stops its own jobs in time.

A job's lease is renewed by the process's :class:`~synth_workers.ledger.lease.LeaseKeeper`.
When the process cannot reach Postgres (a network partition, a dead link), its renewals
fail and, on the ledger's side, its leases expire; the reaper on another host then hands the
jobs to other workers. The :class:`Fence` makes sure that by then this process is no longer
running them:

- **The worker's own view of each lease.** A lease that Postgres set with
  ``now() + SYNTH_LEASE_SECONDS`` cannot end before ``t + SYNTH_LEASE_SECONDS`` on this
  process's monotonic clock, where ``t`` is when the claim or the renewal that set it was
  *sent* (the statement ran after that). The fence keeps that bound per job; no round trip
  is needed to know that a lease is over, so the check works while a renewal hangs on a
  dead connection.
- **Stop at expiry.** Once a job's lease is over on this clock (or a renewal showed the job
  is no longer this process's: reaped, taken by another), the job is *fenced*:
  ``Task.stop_requested`` turns true and ``Task.raise_if_cancelled()`` raises
  :class:`SelfFencedError`, a :class:`~synth_workers.runner.LeaseLostError`, so the job ends
  the way a cancel-while-running does but is **not** recorded as cancelled: nothing is
  written, and the reaper's retry runs it elsewhere. A job that does not check (or a
  completion still waiting to be written) finishes on its own; whatever it then writes
  (``effect_transaction``, the completion) is refused by the ledger, fenced by the claim's
  attempt, once the job was reaped, and recorded in ``synth_late_completions``.
- **Stop starting jobs.** While the process is cut off (a renewal outstanding or failed and
  no ledger contact for a whole lease), a new job waits up to a lease for the ledger before
  it is claimed, so a worker that can still read Redis does not drain its queues into
  claims that cannot succeed (a message it holds meanwhile is re-published by the
  reconciler elsewhere and its late claim is refused).

Timing (documented in ``docs/deployment.md``, "Partitions and self-fencing"): the worker
fences a job at ``t_sent + lease`` (its clock), the ledger's lease ends at
``t_db + lease >= t_sent + lease``, and the reaper takes it back only at lease end plus
``SYNTH_LEASE_GRACE`` (the ledger's clock): the grace is the time the job has to notice and
stop (its polling interval) plus any clock-rate drift between the hosts over one lease.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from synth_workers.errors import SynthWorkersError

log = logging.getLogger(__name__)


class SelfFencedError(SynthWorkersError):
    """This worker could not renew the job's lease before it expired (cut off from the
    ledger), or learnt it lost the job: it stops the job and records nothing; the reaper
    hands the job to another worker."""


class Fence:
    """Per-process record of how long each running job's lease surely holds (thread-safe).

    ``clock`` is monotonic seconds (injectable for tests); ``lease`` is
    ``SYNTH_LEASE_SECONDS``.
    """

    def __init__(self, lease: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.lease = lease
        self.clock = clock
        self._valid_until: dict[str, float] = {}
        self._lost: set[str] = set()
        self._logged: set[str] = set()
        #: When the ledger last answered a claim or renewal of this process (sent-at time).
        self._contact = clock()
        #: Sent-at time of the oldest renewal since the last one that succeeded, or ``None``.
        self._unconfirmed_since: float | None = None
        self._lock = threading.Lock()
        self._reachable = threading.Condition(self._lock)

    # --- what the keeper and the runner report ------------------------------------------------
    def claimed(self, job_id: str, sent_at: float) -> None:
        """The claim of ``job_id``, sent at ``sent_at``, succeeded: its lease holds a lease."""
        with self._lock:
            self._valid_until[job_id] = sent_at + self.lease
            self._lost.discard(job_id)
            self._logged.discard(job_id)
            self._contact = max(self._contact, sent_at)

    def renewing(self, sent_at: float) -> None:
        """A renewal is about to be sent."""
        with self._lock:
            if self._unconfirmed_since is None:
                self._unconfirmed_since = sent_at

    def renewed(self, sent_at: float, held: Iterable[str], asked: Iterable[str]) -> None:
        """The renewal sent at ``sent_at`` for the jobs ``asked`` answered: ``held`` are
        still this process's (their leases run from ``sent_at``); the others were lost."""
        held = set(held)
        with self._reachable:
            for job_id in asked:
                if job_id in held:
                    if job_id in self._valid_until:
                        self._valid_until[job_id] = sent_at + self.lease
                elif job_id in self._valid_until:
                    self._lost.add(job_id)
            self._contact = max(self._contact, sent_at)
            self._unconfirmed_since = None
            self._reachable.notify_all()

    def forget(self, job_id: str) -> None:
        """``job_id`` left this process (its outcome is written, or it stopped)."""
        with self._lock:
            self._valid_until.pop(job_id, None)
            self._lost.discard(job_id)
            self._logged.discard(job_id)

    # --- what jobs ask -------------------------------------------------------------------------
    def fenced(self, job_id: str) -> bool:
        """Whether ``job_id`` must stop: its lease is over on this clock, or it was lost."""
        with self._lock:
            until = self._valid_until.get(job_id)
            if until is None:
                return False
            lost = job_id in self._lost
            if not lost and self.clock() < until:
                return False
            first = job_id not in self._logged
            self._logged.add(job_id)
        if first:
            log.warning(
                "job %s self-fenced: %s; stopping it (the reaper hands it to another worker)",
                job_id,
                "another worker holds it now"
                if lost
                else f"its lease ({self.lease:g}s) could not be renewed",
            )
        return True

    @property
    def cut_off(self) -> bool:
        """A renewal is outstanding or failed and the ledger has not answered for a lease."""
        with self._lock:
            return self._cut_off()

    def _cut_off(self) -> bool:
        return self._unconfirmed_since is not None and self.clock() - self._contact >= self.lease

    def wait_reachable(self, timeout: float) -> bool:
        """Block while cut off, up to ``timeout`` seconds; returns whether the ledger answers
        (or was never found out of reach)."""
        deadline = self.clock() + timeout
        with self._reachable:
            while self._cut_off():
                left = deadline - self.clock()
                if left <= 0:
                    return False
                self._reachable.wait(min(left, 0.5))
        return True
