"""A worker's side of a job: claim, lease renewal, and every fenced finish.

A worker *claims* a queued job (``attempt + 1`` is the fencing token, ``lease_owner`` its
process), renews its running jobs' leases in one statement per tick, and finishes a job only
while attempt and lease hold (:data:`_FENCE`); refused ones go to ``synth_late_completions``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg import sql

from synth_workers.ledger.rows import (
    Claim,
    LedgerRows,
    arguments_json,
    encode_result,
    exception_origin,
    result_json,
    text_array,
)
from synth_workers.states import EventKind, JobState

# States as literals, not parameters: with ``state = $1`` Postgres re-plans these statements on
# every execution (only a custom plan may use the partial index ``synth_jobs_leases``, so the
# generic plan is never chosen; bench/README.md, drain).
_STATES = {s.name.lower(): sql.Literal(s.value) for s in JobState}
_CLAIM = sql.SQL(
    "UPDATE synth_jobs SET state = {running}, attempt = attempt + 1, "
    "lease_owner = %(owner)s, lease_expires_at = now() + make_interval(secs => %(lease)s), "
    "started_at = now(), updated_at = now() "
    "WHERE id = %(id)s AND state = {queued} AND NOT cancel_requested "
    "AND (expires_at IS NULL OR expires_at > now()) RETURNING attempt, max_attempts, task, "
    "queue, user_id, extract(epoch FROM enqueued_at), correlation_id, waited OR (maybe_waited "
    "AND EXISTS (SELECT 1 FROM synth_waits w WHERE w.job_id = synth_jobs.id))"
).format(**_STATES)
#: By primary key whatever the statistics say; waits looked up if maybe (bench/README, drain)
_COMPLETE = sql.SQL(
    "UPDATE synth_jobs j SET state = {succeeded}, result = v.result, "
    "finished_at = now(), lease_owner = NULL, lease_expires_at = NULL, "
    "updated_at = now() FROM (SELECT unnest(%(done_ids)s::uuid[]) AS id, "
    "unnest(%(done_attempts)s::int[]) AS attempt, unnest(%(done_owners)s::text[]) AS owner, "
    "unnest(%(done_results)s::jsonb[]) AS result) v WHERE j.id = v.id AND j.id = ANY("
    "%(done_ids)s::uuid[]) AND j.attempt = v.attempt AND j.lease_owner = v.owner AND "
    "j.state = {running} RETURNING j.id, j.waited OR (j.maybe_waited AND EXISTS (SELECT 1 "
    "FROM synth_waits w WHERE w.job_id = j.id)) AS waited"
).format(**_STATES)
_COMPLETE_AND_CLAIM_Q = (
    sql.SQL(
        "WITH done AS ({complete}), claimed AS ({claim}) "
        "SELECT c.*, (SELECT coalesce(array_agg(id), '{{}}') FROM done), "
        "(SELECT coalesce(array_agg(id) FILTER (WHERE waited), '{{}}') FROM done) "
        "FROM (SELECT 1) one LEFT JOIN claimed c ON true"
    )
    .format(complete=_COMPLETE, claim=_CLAIM)
    .as_bytes(None)
)
_CLAIM_Q, _COMPLETE_Q = _CLAIM.as_bytes(None), _COMPLETE.as_bytes(None)  # rendered once
#: The claim still holds: the row's attempt and lease are the claim's (see :func:`_fenced`).
_FENCE = sql.SQL(
    "id = %(id)s AND attempt = %(attempt)s AND lease_owner = %(owner)s AND state = {running}"
).format(**_STATES)


def _fenced(claim: Claim) -> dict[str, Any]:
    """The parameters of :data:`_FENCE` for ``claim``."""
    return {
        "id": claim.job_id,
        "attempt": claim.attempt,
        "owner": claim.owner,
        "running": JobState.RUNNING,
    }


def _completion_params(done: Sequence[tuple[Claim, Any]]) -> dict[str, Any]:
    """The arrays as text literals: psycopg dumps a list in Python (a third of the claim's
    cost in the pool processes), a string in C. (Not one jsonb: unnest's row estimate keeps
    the join on the primary key.)"""
    return {
        "done_ids": text_array(c.job_id for c, _ in done),
        "done_attempts": text_array(str(int(c.attempt)) for c, _ in done),
        "done_owners": text_array(c.owner for c, _ in done),
        "done_results": text_array(result_json(r) for _, r in done),
    }


class Fencing(LedgerRows):
    """Claims, leases and fenced finishes."""

    def claim(
        self, job_id: str, owner: str, complete: Sequence[tuple[Claim, Any]] = ()
    ) -> Claim | None:
        """Take a queued job for ``owner``; ``None`` when it is not queued (already taken,
        finished, cancelled, or not due). ``complete``: finished jobs of this process whose
        fenced completion rides along in the same statement (one round trip per job)."""
        params = {"owner": owner, "lease": self.settings.lease_seconds, "id": job_id}
        if complete:
            params.update(_completion_params(complete))
        with self.held() as conn:
            row = conn.execute(_COMPLETE_AND_CLAIM_Q if complete else _CLAIM_Q, params).fetchone()
        if complete:
            assert row is not None
            self._late_unless({str(i) for i in row[8]}, complete, {str(i) for i in row[9]})
            if row[0] is None:
                return None
        if row is None:
            return None
        task, queue, user, enqueued, corr, waited = row[2:8]
        args = (task, queue, user, corr, float(enqueued), bool(waited))
        claim = Claim(job_id, int(row[0]), row[1], owner, *args)
        self.announce_started(claim)
        return claim

    def _late_unless(
        self, completed: set[str], done: Sequence[tuple[Claim, Any]], waited: set[str]
    ) -> None:
        """Record refused completions as late; announce the others (``waited``: backend.py)."""
        for claim, _ in done:
            if claim.job_id not in completed:
                self.record_late(claim, JobState.SUCCEEDED)
            else:
                self.announce_finish(claim, EventKind.SUCCEEDED, waited=claim.job_id in waited)

    def renew(self, owner: str, job_ids: Sequence[str]) -> list[tuple[str, bool]]:
        """Extend ``owner``'s leases on ``job_ids`` only, in one statement: (job, cancel asked)."""
        with self.connection() as conn:
            rows = conn.execute(
                "UPDATE synth_jobs SET lease_expires_at = now() + make_interval(secs => %s) "
                "WHERE id = ANY(%s::uuid[]) AND lease_owner = %s AND state = 'running' "
                "RETURNING id, cancel_requested",
                (self.settings.lease_seconds, list(job_ids), owner),
            ).fetchall()
        return [(str(r[0]), bool(r[1])) for r in rows]

    def lock_claim(self, conn: psycopg.Connection[Any], claim: Claim) -> bool:
        """Lock the job's row in ``conn``'s transaction if ``claim`` still holds."""
        query = sql.SQL("SELECT 1 FROM synth_jobs WHERE {fence} FOR UPDATE").format(fence=_FENCE)
        return conn.execute(query, _fenced(claim)).fetchone() is not None

    def succeed(
        self, claim: Claim, result: Any, conn: psycopg.Connection[Any] | None = None
    ) -> bool:
        return self._finish(
            claim,
            JobState.SUCCEEDED,
            sql.SQL("state = %(state)s, result = %(result)s, finished_at = now()"),
            {"state": JobState.SUCCEEDED, "result": encode_result(result)},
            conn,
            event=(EventKind.SUCCEEDED, {}),
        )

    def succeed_many(self, done: Sequence[tuple[Claim, Any]]) -> set[str]:
        """Fenced completion of several jobs in one statement; returns the ids completed
        (the others lost their lease: recorded as late)."""
        if not done:
            return set()
        with self.connection() as conn:
            rows = conn.execute(_COMPLETE_Q, _completion_params(done)).fetchall()
        completed = {str(r[0]) for r in rows}
        self._late_unless(completed, done, {str(r[0]) for r in rows if r[1]})
        return completed

    def retry_later(
        self,
        claim: Claim,
        delay: float,
        error: BaseException,
        failure_class: str,
        *,
        arguments: tuple[list[Any], dict[str, Any]] | None = None,
        expires_at: datetime | None = None,
    ) -> bool:
        """The attempt failed: run it again in ``delay`` seconds, unless the job was
        cancelled meanwhile or expires before then (it ends ``cancelled``). ``arguments``:
        the next run's (args, kwargs), Celery's ``self.retry(args=, kwargs=)``;
        ``expires_at``: its new expiry, ``self.retry(expires=)`` (the stored message's
        ``expires`` header with it)."""
        if self.cancel_if_requested(claim, delay):
            return True
        assignments = [
            sql.SQL(
                "state = %(state)s, run_at = now() + make_interval(secs => %(delay)s), "
                "retries = retries + 1, failure_class = %(failure_class)s, "
                "error_class = %(error_class)s, last_error = %(error)s, "
                "error_module = %(module)s, error_args = %(args_of_error)s"
            )
        ]
        # the exception's module and arguments: Celery's RETRY result is the exception
        module, error_args = exception_origin(error, type(error).__name__)
        params: dict[str, Any] = {
            "state": JobState.RETRYING,
            "delay": delay,
            "failure_class": failure_class,
            "error_class": type(error).__name__,
            "error": str(error)[:4000],
            "module": module,
            "args_of_error": error_args,
        }
        if arguments is not None:
            assignments.append(sql.SQL("args = %(args)s, payload = %(payload)s"))
            params["args"] = arguments_json(arguments[0]) if arguments[0] else None
            params["payload"] = arguments_json(arguments[1])
        if expires_at is not None:
            assignments.append(
                sql.SQL(
                    "expires_at = %(expires_at)s, message = CASE WHEN message IS NULL THEN NULL"
                    " ELSE jsonb_set(message, '{headers,expires}', to_jsonb(%(expires)s::text))"
                    " END"
                )
            )
            params["expires_at"] = expires_at
            params["expires"] = expires_at.isoformat()
        return self._finish(
            claim,
            JobState.RETRYING,
            sql.SQL(", ").join(assignments),
            params,
            event=(
                EventKind.RETRYING,
                {
                    "failure_class": failure_class,
                    "error_class": type(error).__name__,
                    "delay": delay,
                },
            ),
        )

    def dead(
        self,
        claim: Claim,
        failure_class: str,
        error_class: str,
        error: str,
        traceback: str,
        exc: BaseException | None = None,
    ) -> bool:
        """Dead-letter the claimed job. ``exc`` (default: the exception being handled, when
        its class is ``error_class``) also keeps the exception's module and arguments, so
        Celery's result API raises the original exception (``synth_workers.backend``)."""
        module, args = exception_origin(exc, error_class)
        return self._finish(
            claim,
            JobState.DEAD,
            sql.SQL(
                "state = %(state)s, finished_at = now(), failure_class = %(failure_class)s, "
                "error_class = %(error_class)s, last_error = %(error)s, "
                "traceback = %(traceback)s, error_module = %(module)s, error_args = %(args)s"
            ),
            {
                "state": JobState.DEAD,
                "failure_class": failure_class,
                "error_class": error_class,
                "error": error[:4000],
                "traceback": traceback[-16000:],
                "module": module,
                "args": args,
            },
            event=(EventKind.DEAD, {"failure_class": failure_class, "error_class": error_class}),
        )

    def requeue_rejected(self, claim: Claim) -> bool:
        """Celery's ``Reject(requeue=True)``: queued again for the broker's redelivery."""
        return self._finish(
            claim,
            JobState.QUEUED,
            sql.SQL("state = %(state)s, published_at = now()"),
            {"state": JobState.QUEUED},
            event=(EventKind.QUEUED, {"reason": "rejected_requeue"}),
        )

    def cancelled_while_running(self, claim: Claim) -> bool:
        return self._finish(
            claim,
            JobState.CANCELLED,
            sql.SQL("state = %(state)s, finished_at = now()"),
            {"state": JobState.CANCELLED},
            event=(EventKind.CANCELLED, {"while_running": True}),
        )

    # --- deferral (a shared rate limit or a provider's 429: wait, no attempt used) -------
    def defer(
        self, claim: Claim, delay: float, reason: str, max_seconds: float | None = None
    ) -> Literal["deferred", "lost", "exhausted", "cancelled"]:
        """Put the running job back to ``scheduled`` in ``delay`` seconds and give its
        attempt back (``attempt - 1``), fenced by the claim: ``"deferred"``, or ``"lost"``
        when the claim no longer holds (recorded as late), or ``"cancelled"`` when the job
        was cancelled meanwhile or expires before then (it ends so).

        With ``max_seconds`` (a provider's 429, not a wait on the platform's own limits) the
        job's first such deferral is remembered, and once it is ``max_seconds`` old the job is
        left running and ``"exhausted"`` is returned: the caller fails the attempt instead.
        """
        if self.cancel_if_requested(claim, delay):
            return "cancelled"
        assignments = sql.SQL(
            "state = %(state)s, run_at = now() + make_interval(secs => %(delay)s), "
            "attempt = attempt - 1"
        )
        params = {"state": JobState.SCHEDULED, "delay": delay}
        event = (EventKind.SCHEDULED, {"reason": "deferred", "why": reason, "delay": delay})
        if max_seconds is None:
            done = self._finish(claim, "deferred", assignments, params, event=event)
            return "deferred" if done else "lost"
        query = sql.SQL(
            "SELECT first_deferred_at IS NOT NULL AND first_deferred_at <= now() - "
            "make_interval(secs => %(max_seconds)s) FROM synth_jobs WHERE {fence} FOR UPDATE"
        ).format(fence=_FENCE)
        with self.connection() as conn, conn.transaction():
            row = conn.execute(query, {**_fenced(claim), "max_seconds": max_seconds}).fetchone()
            if row is not None and row[0]:
                return "exhausted"
            done = row is not None and self._finish(
                claim,
                "deferred",
                sql.SQL("{}, first_deferred_at = coalesce(first_deferred_at, now())").format(
                    assignments
                ),
                params,
                conn=conn,
            )
        if row is None:
            self.record_late(claim, "deferred")
        if not done:
            return "lost"
        self.announce_finish(claim, event[0], **event[1])
        return "deferred"

    def _finish(
        self,
        claim: Claim,
        outcome: str,
        assignments: sql.Composable,
        params: dict[str, Any],
        conn: psycopg.Connection[Any] | None = None,
        event: tuple[str, dict[str, Any]] | None = None,
    ) -> bool:
        """One fenced state change (``assignments`` with named ``params``); ``event`` is
        announced once it commits (by the caller when ``conn`` is the caller's transaction:
        see :meth:`announce_finish`)."""
        query = sql.SQL(
            "UPDATE synth_jobs SET {assignments}, lease_owner = NULL, "
            "lease_expires_at = NULL, updated_at = now() WHERE {fence}"
        ).format(assignments=assignments, fence=_FENCE)
        args = {**params, **_fenced(claim)}
        if conn is not None:
            done = conn.execute(query, args).rowcount == 1
        else:
            with self.connection() as own:
                done = own.execute(query, args).rowcount == 1
        if not done:
            self.record_late(claim, outcome)
        elif event is not None and conn is None:
            self.announce_finish(claim, event[0], **event[1])
        return done

    def record_late(self, claim: Claim, outcome: str) -> None:
        if self.lifecycle.listening:
            self.lifecycle.announce(
                EventKind.LATE_REFUSED,
                claim.job_id,
                **self.about(claim),
                data={"outcome": outcome},
            )
        with self.connection() as conn:
            conn.execute(
                "INSERT INTO synth_late_completions (job_id, attempt, owner, outcome) "
                "VALUES (%s, %s, %s, %s)",
                (claim.job_id, claim.attempt, claim.owner, outcome),
            )

    # --- cancellation honoured by a running job -------------------------------------------
    def cancel_if_requested(self, claim: Claim, delay: float = 0.0) -> bool:
        """End the claimed job ``cancelled`` (fenced) if it was cancelled while it ran, or if
        it expires within ``delay`` seconds (``last_error`` = ``expired``): a retry or a
        deferral must not run it again. Returns whether it ended so."""
        query = sql.SQL(
            "UPDATE synth_jobs SET state = %(cancelled)s, finished_at = now(), last_error = "
            "CASE WHEN cancel_requested THEN last_error ELSE 'expired' END, lease_owner = "
            "NULL, lease_expires_at = NULL, updated_at = now() WHERE {fence} AND "
            "(cancel_requested OR expires_at <= now() + make_interval(secs => %(delay)s)) "
            "RETURNING cancel_requested, task, queue, attempt"
        ).format(fence=_FENCE)
        params = {**_fenced(claim), "cancelled": JobState.CANCELLED, "delay": max(0.0, delay)}
        with self.connection() as conn:
            row = conn.execute(query, params).fetchone()
        if row is None:
            return False
        reason = "cancelled" if row[0] else "expired"
        self.announce_finish(claim, EventKind.CANCELLED, while_running=True, reason=reason)
        return True
