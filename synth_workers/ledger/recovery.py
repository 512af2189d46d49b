"""Taking jobs back: lost workers, hard time limits, expired leases, expiry and purges,
and the sweeper's passes (promotion, outbox relay, reconciliation).

Scans keep their state predicates as constants (``sql.Literal`` of a :class:`JobState`), so
that the partial indexes of the ``0001``/``0007`` migrations match them in every plan,
prepared or not.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from psycopg import sql

from synth_workers.ledger.jobs import Jobs
from synth_workers.ledger.rows import NOT_STARTED, PUBLISHABLE, Publishable, clip_text
from synth_workers.states import EventKind, FailureClass, JobState


def _states(*states: JobState) -> sql.Composable:
    """``states`` as constants, comma-separated, for ``state IN (...)``."""
    return sql.SQL(", ").join(sql.Literal(s) for s in states)


#: A worker lost under a running job: requeue it, or dead-letter it once it has killed
#: ``%(losses)s`` workers (see :func:`_lost_params`).
_LOST = sql.SQL(
    "worker_losses = worker_losses + 1, "
    "state = CASE WHEN worker_losses + 1 >= %(losses)s THEN %(dead)s ELSE %(queued)s END, "
    "failure_class = CASE WHEN worker_losses + 1 >= %(losses)s THEN %(poison)s "
    "ELSE %(lost)s END, finished_at = CASE WHEN worker_losses + 1 >= %(losses)s "
    "THEN now() END, published_at = now(), lease_owner = NULL, lease_expires_at = NULL, "
    "updated_at = now()"
)

_END_CANCELLED = sql.SQL(
    "WITH e AS (UPDATE synth_jobs SET state = %(cancelled)s, last_error = 'expired', "
    "finished_at = now(), updated_at = now() WHERE id IN (SELECT id FROM synth_jobs WHERE "
    "expires_at <= now() AND state IN ({not_started}) LIMIT %(limit)s "
    "FOR UPDATE SKIP LOCKED) RETURNING id, task, queue, attempt), "
    "c AS (UPDATE synth_jobs SET state = %(cancelled)s, finished_at = now(), lease_owner = "
    "NULL, lease_expires_at = NULL, updated_at = now() WHERE id IN (SELECT id FROM "
    "synth_jobs WHERE state = {running} AND lease_expires_at < now() AND cancel_requested "
    "LIMIT %(limit)s FOR UPDATE SKIP LOCKED) RETURNING id, task, queue, attempt) "
    "SELECT 'expired', * FROM e UNION ALL SELECT 'cancelled', * FROM c"
).format(not_started=_states(*NOT_STARTED), running=sql.Literal(JobState.RUNNING))

_PROMOTE = sql.SQL(
    "WITH due AS (SELECT id FROM synth_jobs WHERE state IN ({waiting}) AND run_at <= now() "
    "AND (expires_at IS NULL OR expires_at > now()) AND NOT cancel_requested "
    "ORDER BY run_at LIMIT %s FOR UPDATE SKIP LOCKED) "
    "UPDATE synth_jobs j SET state = %s, published_at = now(), updated_at = now() "
    "FROM due WHERE j.id = due.id RETURNING {publishable}, j.run_at"
).format(waiting=_states(JobState.SCHEDULED, JobState.RETRYING), publishable=PUBLISHABLE)

_OUTBOX = sql.SQL(
    "WITH o AS (SELECT id FROM synth_jobs WHERE state = {queued} AND published_at IS NULL "
    "LIMIT %s FOR UPDATE SKIP LOCKED) UPDATE synth_jobs j SET published_at = now() "
    "FROM o WHERE j.id = o.id RETURNING {publishable}"
).format(queued=sql.Literal(JobState.QUEUED), publishable=PUBLISHABLE)

#: Past its expiry plus ``SYNTH_LEASE_GRACE``: a cut-off owner has stopped it by then
#: (self-fencing: ``synth_workers.selffence``).
_REAP = sql.SQL(
    "WITH x AS (SELECT id FROM synth_jobs WHERE state = {running} AND "
    "lease_expires_at < now() - make_interval(secs => %(grace)s) "
    "AND NOT cancel_requested LIMIT %(limit)s "
    "FOR UPDATE SKIP LOCKED) "
    "UPDATE synth_jobs j SET {lost}, error_class = 'LeaseExpired', "
    "last_error = 'lease expired: worker ' || coalesce(lease_owner, '?') || "
    "' stopped renewing' FROM x WHERE j.id = x.id RETURNING {publishable}, j.state"
).format(running=sql.Literal(JobState.RUNNING), lost=_LOST, publishable=PUBLISHABLE)

_STALE = sql.SQL(
    "SELECT {publishable} FROM synth_jobs j WHERE state = {queued} "
    "AND published_at < now() - make_interval(secs => %s) "
    "AND NOT cancel_requested AND (expires_at IS NULL OR expires_at > now()) "
    "ORDER BY published_at LIMIT %s"
).format(queued=sql.Literal(JobState.QUEUED), publishable=PUBLISHABLE)


class Recovery(Jobs):
    """Jobs whose worker, lease or time is gone; the sweeper's statements."""

    def _lost_params(self) -> dict[str, Any]:
        return {
            "losses": self.settings.poison_pill_losses,
            "dead": JobState.DEAD,
            "queued": JobState.QUEUED,
            "poison": FailureClass.POISON_PILL,
            "lost": FailureClass.WORKER_LOST,
        }

    def worker_lost(self, job_id: str, owner_prefix: str) -> str | None:
        """The process running ``job_id`` died: requeue it, or dead-letter it as a poison
        pill once it has killed ``SYNTH_POISON_PILL_LOSSES`` workers; a job cancelled while it
        ran ends ``cancelled`` instead (never counted as a loss). Returns the new state."""
        if self.cancel_lost(job_id, owner_prefix):
            return JobState.CANCELLED
        query = sql.SQL(
            "UPDATE synth_jobs SET {lost}, error_class = 'WorkerLostError', "
            "last_error = 'the worker process died' WHERE id = %(id)s AND state = %(running)s "
            "AND NOT cancel_requested AND starts_with(lease_owner, %(prefix)s) "
            "RETURNING state, task, queue, attempt"
        ).format(lost=_LOST)
        params = {
            **self._lost_params(),
            "id": job_id,
            "running": JobState.RUNNING,
            "prefix": owner_prefix,
        }
        with self.connection() as conn:
            row = conn.execute(query, params).fetchone()
        if row is None:
            return None
        if row[0] == JobState.DEAD:
            self._announce_row(EventKind.DEAD, job_id, row, failure_class=FailureClass.POISON_PILL)
        else:
            self._announce_row(EventKind.QUEUED, job_id, row, reason="worker_lost")
        return str(row[0])

    def hard_timeout(self, job_id: str, error: str, owner_prefix: str) -> str | None:
        """The job hit its hard time limit (its process was killed): retry (a retry like any
        other: ``retries`` counts it) or dead-letter; a job cancelled while it ran ends
        ``cancelled``."""
        if self.cancel_lost(job_id, owner_prefix):
            return JobState.CANCELLED
        with self.connection() as conn:
            row = conn.execute(
                "UPDATE synth_jobs SET state = CASE WHEN attempt >= COALESCE(max_attempts, "
                "%(max)s) THEN %(dead)s ELSE %(retrying)s END, run_at = now(), "
                "failure_class = %(hard)s, error_class = 'TimeLimitExceeded', "
                "last_error = %(error)s, finished_at = CASE WHEN attempt >= "
                "COALESCE(max_attempts, %(max)s) THEN now() END, retries = retries + CASE "
                "WHEN attempt >= COALESCE(max_attempts, %(max)s) THEN 0 ELSE 1 END, "
                "lease_owner = NULL, "
                "lease_expires_at = NULL, updated_at = now() WHERE id = %(id)s "
                "AND state = %(running)s AND NOT cancel_requested "
                "AND starts_with(lease_owner, %(prefix)s) RETURNING state, task, queue, attempt",
                {
                    "max": self.settings.max_attempts,
                    "dead": JobState.DEAD,
                    "retrying": JobState.RETRYING,
                    "hard": FailureClass.HARD_TIMEOUT,
                    "error": error,
                    "id": job_id,
                    "running": JobState.RUNNING,
                    "prefix": owner_prefix,
                },
            ).fetchone()
        if row is None:
            return None
        self._announce_row(
            EventKind.DEAD if row[0] == JobState.DEAD else EventKind.RETRYING,
            job_id,
            row,
            failure_class=FailureClass.HARD_TIMEOUT,
            error_class="TimeLimitExceeded",
        )
        return str(row[0])

    def cancel_lost(self, job_id: str, owner_prefix: str) -> bool:
        """The process running ``job_id`` died or was killed (``revoke(terminate=True)``, a
        hard time limit) after the job was cancelled: it ends ``cancelled``, not requeued."""
        with self.connection() as conn:
            row = conn.execute(
                "UPDATE synth_jobs SET state = %s, finished_at = now(), lease_owner = NULL, "
                "lease_expires_at = NULL, updated_at = now() WHERE id = %s AND state = %s "
                "AND cancel_requested AND starts_with(lease_owner, %s) "
                "RETURNING state, task, queue, attempt",
                (JobState.CANCELLED, job_id, JobState.RUNNING, owner_prefix),
            ).fetchone()
        if row is None:
            return False
        self._announce_row(EventKind.CANCELLED, job_id, row, reason="cancelled", while_running=True)
        return True

    def end_cancelled(self, limit: int = 1000) -> int:
        """The sweeper's pass over cancellations: jobs not started whose ``expires_at``
        passed end ``cancelled`` (``last_error`` = ``expired``), and cancelled jobs whose
        worker stopped renewing their lease end ``cancelled`` instead of being reaped and run
        again. One statement; returns how many jobs ended."""
        with self.connection() as conn:
            rows = conn.execute(
                _END_CANCELLED, {"cancelled": JobState.CANCELLED, "limit": limit}
            ).fetchall()
        for reason, job_id, task, queue, attempt in rows:
            self._announce_row(
                EventKind.CANCELLED, str(job_id), (None, task, queue, attempt), reason=reason
            )
        return len(rows)

    def cancel_purged(self, job_ids: Sequence[str], reason: str = "purged") -> int:
        """Messages deleted from Redis by ``celery purge`` / ``app.control.purge()``: their
        queued jobs end ``cancelled`` with ``last_error`` = ``reason``, so no reconciler
        publishes them again. Ids that are not UUIDs (foreign messages) are skipped; returns
        how many jobs were cancelled."""
        ids: list[str] = []
        for job_id in job_ids:
            try:
                ids.append(str(uuid.UUID(str(job_id))))
            except ValueError:
                continue
        if not ids:
            return 0
        with self.connection() as conn, conn.transaction():
            self.durable(conn)
            rows = self._cancel_unstarted(
                conn, sql.SQL("id = ANY(%s::uuid[])"), (ids,), (JobState.QUEUED,), reason
            )
        for row in rows:
            self._announce_row(EventKind.CANCELLED, str(row[0]), row[1:], reason=reason)
        return len(rows)

    def expire(self, job_id: str, task: str, queue: str, raw: str, error: str) -> str:
        """A message whose ``expires`` passed before it started: its live job ends
        ``cancelled`` (Celery's *revoked*); one without a ledger row is dead-lettered
        (reason ``expired``). Returns the state it ended in, or ``"final"`` when the job
        had already started or finished (nothing changes)."""
        with self.connection() as conn:
            rows = self._cancel_unstarted(
                conn, sql.SQL("id = %s"), (job_id,), NOT_STARTED, clip_text(error, 4000)
            )
            exists = bool(rows) or (
                conn.execute("SELECT 1 FROM synth_jobs WHERE id = %s", (job_id,)).fetchone()
                is not None
            )
        if rows:
            self._announce_row(EventKind.CANCELLED, job_id, rows[0][1:], reason="expired")
            return JobState.CANCELLED
        if exists:
            return "final"
        self.record_rejected(job_id, task, queue, raw, "expired", error)
        return JobState.DEAD

    # --- sweeper -------------------------------------------------------------------------
    def promote_due(self, limit: int = 1000) -> list[Publishable]:
        """Scheduled jobs and retries whose time has come → queued (to publish)."""
        return self._to_publish(_PROMOTE, (limit, JobState.QUEUED), "due")

    def take_outbox(self, limit: int = 1000) -> list[Publishable]:
        """Committed transactional enqueues not yet published."""
        return self._to_publish(_OUTBOX, (limit,), "outbox")

    def reap_expired(self, limit: int = 1000) -> tuple[list[Publishable], int]:
        """Running jobs whose lease expired ``SYNTH_LEASE_GRACE`` ago → queued again (or
        dead as poison pills)."""
        with self.connection() as conn:
            params = {**self._lost_params(), "limit": limit, "grace": self.settings.reap_grace}
            rows = conn.execute(_REAP, params).fetchall()
        requeued = [Publishable.from_row(r) for r in rows if r[9] == JobState.QUEUED]
        if self.lifecycle.listening:
            for r in rows:
                if r[9] == JobState.QUEUED:
                    self.lifecycle.announce(
                        EventKind.QUEUED,
                        str(r[0]),
                        task=r[1],
                        queue=r[2],
                        data={"reason": "lease_expired"},
                    )
                else:
                    self.lifecycle.announce(
                        EventKind.DEAD,
                        str(r[0]),
                        task=r[1],
                        queue=r[2],
                        data={
                            "failure_class": FailureClass.POISON_PILL,
                            "error_class": "LeaseExpired",
                        },
                    )
        return requeued, len(rows) - len(requeued)

    def stale_queued(self, grace: float, limit: int = 5000) -> list[Publishable]:
        """Queued jobs published more than ``grace`` seconds ago (to check against Redis)."""
        return self._to_publish(_STALE, (grace, limit))

    def mark_republished(self, ids: Sequence[str]) -> None:
        with self.connection() as conn:
            conn.execute(
                "UPDATE synth_jobs SET published_at = now() WHERE id = ANY(%s) AND state = %s",
                (list(ids), JobState.QUEUED),
            )

    def _to_publish(
        self, query: sql.Composed, params: Sequence[Any], reason: str | None = None
    ) -> list[Publishable]:
        with self.connection() as conn:
            rows = conn.execute(query, params).fetchall()
        jobs = [Publishable.from_row(r) for r in rows]
        if query is _PROMOTE:  # sent with the time it was due as its eta (Celery's)
            jobs = [replace(job, eta=row[-1]) for job, row in zip(jobs, rows, strict=True)]
        if reason is not None:
            self._announce_queued(jobs, reason)
        return jobs
