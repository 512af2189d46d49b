"""Deferred completions: a worker process's finished jobs are completed in the same
statement that claims its next job (one round trip per job), or by a thread after a short
linger when no next job comes. The linger is kept while claims follow completions within it
(a backlog) and while other jobs of the process still run (a threads pool's burst); a process
whose last completions no claim carried, and which runs nothing else, writes a completion at
once, as it does one someone waits on, so a job that ends on an idle worker is seen ended
(``wait()``, ``AsyncResult.get()``) without the linger.

A job's lease keeps being renewed until its completion is written; if the process dies
before that, the lease expires and the job runs again (at least once; effects written with
``effect_transaction`` still happen exactly once). So the next job never starts while the
thread's write of its predecessors' completions is in flight (:meth:`Completer.take` waits
for it): a next job that kills its process (a poison pill) cannot take them down with it.

A completion write that fails because Postgres cannot be reached (or is read-only, as a
standby is during a failover) is never dropped: the
thread retries it with exponential backoff (``RETRY_FIRST`` doubling up to ``RETRY_MAX``)
until it lands, while the lease keeper goes on renewing the jobs' leases, so an outage
shorter than the lease neither runs a succeeded job again nor counts it as a worker loss
(three of which would dead-letter it as a poison pill). Only a statement error (a bug, not an
outage) gives up after ``STATEMENT_TRIES``. :meth:`Completer.stop` ends the thread (at worker
process shutdown).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import psycopg

from synth_workers.errors import ServiceUnavailableError
from synth_workers.ledger.store import is_connection_failure

if TYPE_CHECKING:
    from synth_workers.ledger.lease import LeaseKeeper
    from synth_workers.ledger.store import Claim, Ledger

log = logging.getLogger(__name__)
LINGER_SECONDS = 0.005
MAX_PENDING = 200
#: Backoff of a completion write that failed for want of Postgres: first wait, and cap.
RETRY_FIRST = 0.1
RETRY_MAX = 5.0
#: A write that failed with an error of the statement itself is given up after this many.
STATEMENT_TRIES = 3

Done = list[tuple["Claim", Any]]


#: SQLSTATE of a write refused by a read-only server: a standby during a failover.
READ_ONLY = "25006"


def _outage(exc: BaseException) -> bool:
    """Whether ``exc`` means Postgres was out of reach, or read-only for now (a failover),
    so the write is retried; not a statement error."""
    if isinstance(exc, psycopg.Error) and exc.sqlstate == READ_ONLY:
        return True
    return isinstance(exc, ServiceUnavailableError) or is_connection_failure(exc)


class Completer:
    """One worker process's completion writer (one thread, stoppable)."""

    def __init__(self, ledger: Ledger, keeper: LeaseKeeper) -> None:
        self.ledger = ledger
        self.keeper = keeper
        self._pending: Done = []
        #: Completions whose write failed for want of Postgres, retried by the thread.
        self._failed: Done = []
        self._lock = threading.Lock()
        #: Held by the thread from taking completions until its write of them ended (one
        #: try): :meth:`take` waits for it.
        self._writing = threading.Lock()
        self._wake = threading.Event()
        #: Set by a completion someone waits on: written without the linger.
        self._hurry = threading.Event()
        #: Whether claims have been carrying completions (the linger is worth it), and when
        #: the last completion was submitted (``time.monotonic``).
        self._carried = False
        self._submitted = 0.0
        #: When the oldest completion now pending was submitted: its linger counts from there.
        self._oldest = 0.0
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="synth-completer", daemon=True)
        self._thread.start()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def submit(self, claim: Claim, result: Any) -> None:
        with self._lock:
            now = time.monotonic()
            if not self._pending:
                self._oldest = now
            self._pending.append((claim, result))
            self._idle.clear()
            full = len(self._pending) >= MAX_PENDING
            self._submitted = now
        if claim.waited:
            self._hurry.set()
        self._wake.set()
        if full:
            self.write(self.take())

    def take(self) -> Done:
        """Hand over every pending completion (the caller, the next claim, writes them).
        A write the thread has in flight is waited for first: the next job never starts
        before its predecessors' completions are written or handed over. (Were it to kill
        its process with them still in the thread, they would be lost, and the reaper
        would run them again and count a worker loss against each.)"""
        with self._writing:
            # A claim within a linger of the last completion: a backlog, worth lingering for.
            self._carried = time.monotonic() - self._submitted < LINGER_SECONDS
            return self._take()

    def _take(self) -> Done:
        with self._lock:
            taken, self._pending = self._pending, []
        return taken

    def written(self, done: Done) -> None:
        """Completions handed over by :meth:`take` are now written (or refused)."""
        for claim, _ in done:
            self.keeper.remove(claim.job_id)
        with self._lock:
            if not self._pending and not self._failed:
                self._idle.set()

    def write(self, done: Done) -> bool:
        """Write ``done`` now, once; if Postgres cannot be reached, hand them to the thread,
        which retries with backoff (the caller, a job's claim, does not wait for it).
        Returns whether they were written."""
        if not done:
            return True
        try:
            self.ledger.succeed_many(done)
        except Exception as exc:
            if not _outage(exc):
                log.exception("writing %d completions failed", len(done))
            else:
                log.warning("writing %d completions failed (%s); retrying", len(done), exc)
            with self._lock:
                self._failed.extend(done)
                self._idle.clear()
            self._wake.set()
            return False
        self.written(done)
        return True

    def flush(self, timeout: float = 10.0) -> bool:
        """Write everything pending now (shutdown, tests); wait up to ``timeout`` seconds
        for earlier failed writes the thread retries. Returns whether all are written."""
        self.write(self.take())
        return self._idle.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Flush, then end the thread (worker process shutdown). Completions still unwritten
        after ``timeout`` are given up: their leases lapse and the reaper takes them back."""
        self.flush(timeout)
        self._stop.set()
        self._hurry.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            self._linger()
            self._hurry.clear()
            if self._stop.is_set():
                break
            with self._writing:
                with self._lock:
                    batch, self._failed = self._failed, []
                batch += self._take()
                if not batch:
                    continue
                self._carried = False  # no claim came for these: write the next at once
                failure = self._attempt(batch)
                if failure is None:
                    continue
            self._write_retrying(batch, failure)

    def _linger(self) -> None:
        """Give the next claim the chance to carry the pending completions: wait until the
        oldest of them has lingered :data:`LINGER_SECONDS` (while claims carry completions or
        other jobs of the process run; else not at all), or someone waits on one of them.
        The linger counts from that completion's submit, not from the thread's wake: in a
        backlog, each claim takes the completion before it, and the thread, woken by an
        earlier one, would otherwise write the one pending when its linger ran out, a
        statement the next claim was about to save."""
        while True:
            with self._lock:
                if not self._pending:
                    return  # a claim took them (the thread writes failed ones at once)
                oldest = self._oldest
            linger = LINGER_SECONDS if self._carried or self._others_run() else 0.0
            remaining = oldest + linger - time.monotonic()
            if remaining <= 0 or self._hurry.wait(remaining):
                return

    def _others_run(self) -> bool:
        """Whether the process holds jobs besides the completions waiting here."""
        with self._lock:
            waiting = len(self._pending) + len(self._failed)
        return self.keeper.held > waiting

    def _attempt(self, batch: Done) -> Exception | None:
        """One write of ``batch``: ``None`` when written, else what it raised."""
        try:
            self.ledger.succeed_many(batch)
        except Exception as exc:
            return exc
        self.written(batch)
        return None

    def _write_retrying(self, batch: Done, failure: Exception) -> None:
        """``batch``'s write failed with ``failure``: write it (plus whatever is submitted
        meanwhile) again with backoff while Postgres is out of reach, until it lands or the
        completer stops; a statement error is given up after ``STATEMENT_TRIES`` tries in
        all, the failed one included."""
        wait = RETRY_FIRST
        statement_errors = 0
        exc: Exception | None = failure
        while True:
            if exc is None:
                try:
                    with self._writing:
                        self.ledger.succeed_many(batch)
                    break
                except Exception as error:
                    exc = error
            if not _outage(exc):
                statement_errors += 1
                log.error(
                    "writing %d completions failed (try %d)",
                    len(batch),
                    statement_errors,
                    exc_info=exc,
                )
                if statement_errors >= STATEMENT_TRIES:
                    break
            else:
                log.warning(
                    "writing %d completions failed: %s; retrying in %.1fs", len(batch), exc, wait
                )
            exc = None
            if self._stop.wait(wait):
                log.error("stopping with %d completions unwritten", len(batch))
                break
            wait = min(wait * 2, RETRY_MAX)
            batch += self._take()
        self.written(batch)
