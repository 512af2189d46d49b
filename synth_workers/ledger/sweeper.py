"""The ledger sweeper: a thread in every worker's main process (a worker bootstep).

Every ``SYNTH_SWEEP_INTERVAL`` seconds — and at once when a transactional enqueue commits
(``LISTEN synth_outbox``) — it publishes committed outbox rows, promotes due delayed jobs and
retries, and takes back jobs whose lease expired (dead-lettering poison pills). Every few
sweeps one worker (a Postgres advisory lock decides) re-publishes queued jobs that Redis no
longer holds (Redis restarted, or a publish was lost); after a slow pass (a large backlog to
read) the next one waits 20 times as long as that pass took. Sweeps from several workers are
safe together: rows are taken with ``FOR UPDATE SKIP LOCKED``. Each pass first ends
cancellations (``Ledger.end_cancelled``): jobs past their ``expires`` and cancelled jobs
whose worker stopped renewing, so neither is promoted, reaped or re-published.

After the ledger was out of reach, expired leases are not reaped until it has been reachable
for a whole lease (:meth:`Sweeper.note_outage`): an outage longer than a lease lapses every
lease at once, and their live owners must get the time to renew or to write the completions
they hold. Its timing decisions (when to reconcile, when to reap again) read an injectable
``clock`` (``time.monotonic``
by default), so that tests can drive them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import bootsteps
from psycopg import sql

from synth_workers.errors import ServiceUnavailableError
from synth_workers.ledger.store import NOTIFY_CHANNEL, is_connection_failure
from synth_workers.ledger.transport import ids_in_redis, publish
from synth_workers.platform import platform_of

if TYPE_CHECKING:
    import psycopg

    from synth_workers.app import SynthCelery

log = logging.getLogger(__name__)
RECONCILE_LOCK = "synth_reconcile"
#: After a reconcile pass that took ``t`` seconds, the next waits at least ``t`` times this.
RECONCILE_BACKOFF = 20.0


class Sweeper:
    def __init__(self, app: SynthCelery, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.platform = platform_of(app)
        #: Seconds, monotonic: what the reconcile schedule is measured with.
        self.clock = clock
        self.settings = self.platform.settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_reconcile = 0.0
        self.reconcile_every = max(self.settings.sweep_interval * 5, 1.0)
        #: Seconds until the next reconcile pass: ``reconcile_every``, or longer after a
        #: slow pass (see :meth:`sweep`).
        self.reconcile_wait = self.reconcile_every
        #: When the ledger last became reachable again after an outage (clock time), or
        #: ``None`` when this sweeper never saw it out of reach: leases are reaped only once
        #: it has been reachable for a whole lease since (see :meth:`note_outage`).
        self._reachable_since: float | None = None
        self._outage = False
        #: Queued jobs a reconcile pass found missing from Redis, and when (clock time) it
        #: first did: see :meth:`reconcile`.
        self._missing_since: dict[str, float] = {}

    def note_outage(self) -> None:
        """The ledger was out of reach. Every lease may have lapsed meanwhile, its owner
        alive but unable to renew (or to write the completion it holds): none is reaped
        until the ledger has been reachable for a whole lease, time for live owners to renew
        and for pending completions to be written, so that neither counts as a worker
        loss nor runs the job again."""
        self._outage = True
        self._reachable_since = None

    def may_reap(self) -> bool:
        if not self._outage:
            return True
        now = self.clock()
        if self._reachable_since is None:
            self._reachable_since = now
        if now - self._reachable_since < self.settings.lease_seconds:
            return False
        self._outage = False
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="synth-sweeper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        listener: psycopg.Connection[Any] | None = None
        while not self._stop.is_set():
            try:
                if listener is None or listener.closed:
                    listener = self.platform.ledger.connect()
                    listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(NOTIFY_CHANNEL)))
                self.sweep()
                # Sleep until the next sweep, or until an outbox commit wakes us.
                for _ in listener.notifies(timeout=self.settings.sweep_interval, stop_after=1):
                    pass
            except Exception as exc:
                if isinstance(exc, ServiceUnavailableError) or is_connection_failure(exc):
                    self.note_outage()
                log.exception("ledger sweep failed; retrying")
                if listener is not None:
                    listener.close()
                listener = None
                self._stop.wait(self.settings.sweep_interval)
        if listener is not None:
            listener.close()

    def sweep(self) -> dict[str, int]:
        """One pass; returns what it did (for logs and tests)."""
        ledger = self.platform.ledger
        counts: dict[str, int] = {"cancelled": ledger.end_cancelled()}
        outbox = ledger.take_outbox()
        publish(self.app, outbox)
        counts["outbox"] = len(outbox)
        due = ledger.promote_due()
        publish(self.app, due)
        counts["promoted"] = len(due)
        requeued, poisoned = ledger.reap_expired() if self.may_reap() else ([], 0)
        publish(self.app, requeued)
        counts["reaped"] = len(requeued)
        counts["poison_pills"] = poisoned
        if requeued or poisoned:
            log.warning(
                "reaped %d expired leases (%d dead as poison pills)", len(requeued), poisoned
            )
        now = self.clock()
        if now - self._last_reconcile >= self.reconcile_wait:
            counts["republished"] = self.reconcile()
            self._last_reconcile = self.clock()
            # A large backlog queued longer than the grace makes a pass read and parse
            # thousands of Redis messages in this (the worker's main) process: keep such passes
            # to about 5 % of the time. A lost message is then found a little later, not never.
            took = self._last_reconcile - now
            self.reconcile_wait = max(self.reconcile_every, took * RECONCILE_BACKOFF)
        return counts

    def reconcile(self) -> int:
        """Re-publish queued jobs that Redis lost; one worker at a time.

        A job is re-published when it was published over ``SYNTH_RECONCILE_GRACE`` ago and
        this sweeper found its message missing from Redis at two passes that far apart. A
        message a worker has taken but not yet claimed (prefetched, or in a batch waiting
        for its pool process) is missing from Redis too; the first look alone would send a
        second copy of every job that waited in Redis past the grace and was then taken,
        and a copy sent before a loss does not carry the loss's "run alone" mark
        (``synth_workers.batched``). By the second look such a job is claimed."""
        ledger = self.platform.ledger
        grace = self.settings.reconcile_grace
        with ledger.connection() as conn:
            row = conn.execute(
                "SELECT pg_try_advisory_lock(hashtext(%s))", (RECONCILE_LOCK,)
            ).fetchone()
            if not row or not row[0]:
                return 0
            try:
                stale = ledger.stale_queued(grace)
                if not stale:
                    self._missing_since = {}
                    return 0
                present = ids_in_redis(
                    self.app, {job.queue for job in stale}, {job.id for job in stale}
                )
                now = self.clock()
                since = self._missing_since
                self._missing_since = {
                    job.id: since.get(job.id, now) for job in stale if job.id not in present
                }
                missing = [
                    job
                    for job in stale
                    if job.id in self._missing_since and now - self._missing_since[job.id] >= grace
                ]
                if missing:
                    # Mark first: a crash between the two only delays the next try.
                    ledger.mark_republished([job.id for job in missing])
                    publish(self.app, missing)
                    log.warning("re-published %d queued jobs missing from Redis", len(missing))
                return len(missing)
            finally:
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (RECONCILE_LOCK,))


class SweeperStep(bootsteps.StartStopStep):
    """Worker bootstep running the :class:`Sweeper` in the worker's main process."""

    label = "synth-ledger-sweeper"
    #: Started once the pool's processes are forked: a process forked while this thread is
    #: inside a connection (a TLS handshake holds OpenSSL's locks, which a fork does not
    #: reset) could inherit a lock no thread of it will ever release, and hang on its first
    #: connection. (Without it the step ran first of all, beside the pool's forks.)
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.sweeper: Sweeper | None = None

    def start(self, parent: Any) -> None:
        self.sweeper = Sweeper(parent.app)
        self.sweeper.start()

    def stop(self, parent: Any) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)
