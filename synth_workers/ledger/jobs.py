"""Job rows: enqueue (insert, adopt), the producer's reads and cancellation, refused
messages, and the effect guard."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from synth_workers.ledger.inserts import Inserts
from synth_workers.ledger.rows import (
    NOTIFY_CHANNEL,
    RESULT_LIMIT_BYTES,
    UNFINISHED,
    Claim,
    arguments_json,
    clip_text,
    encode_result,
    message_json,
)
from synth_workers.states import FINAL_STATES, EventKind, FailureClass, JobState

if TYPE_CHECKING:
    from synth_workers.ledger.refusals import Refusal

_NOTIFY = sql.SQL("NOTIFY {}").format(sql.Identifier(NOTIFY_CHANNEL))

_REJECT = sql.SQL(
    "INSERT INTO synth_jobs (id, task, queue, priority, payload, state, failure_class, "
    "error_class, last_error, finished_at) SELECT v.id, v.task, v.queue, 0, v.payload, "
    "%(dead)s, %(rejected)s, v.reason, v.error, now() FROM unnest(%(ids)s::uuid[], "
    "%(tasks)s::text[], %(queues)s::text[], %(payloads)s::jsonb[], %(reasons)s::text[], "
    "%(errors)s::text[]) AS v(id, task, queue, payload, reason, error) "
    "ON CONFLICT (id) DO UPDATE SET state = %(dead)s, failure_class = %(rejected)s, "
    "error_class = EXCLUDED.error_class, last_error = EXCLUDED.last_error, "
    "finished_at = now(), lease_owner = NULL, lease_expires_at = NULL, updated_at = now() "
    "WHERE synth_jobs.state <> ALL(%(settled)s) RETURNING id"
)


class Jobs(Inserts):
    """Writes and reads job rows outside a worker's claim."""

    def insert_job(
        self,
        conn: psycopg.Connection[Any],
        *,
        job_id: str,
        task: str,
        queue: str,
        priority: int,
        payload: dict[str, Any],
        args: list[Any] | None = None,
        delay: float | None,
        idempotency_key: str | None,
        max_attempts: int | None,
        published: bool,
        replay_of: str | None = None,
        user_id: str | None = None,
        message: dict[str, Any] | None = None,
        expires_at: datetime | None = None,
        rerun_finished: bool = False,
        correlation_id: str | None = None,
        maybe_waited: bool = True,
    ) -> str:
        """Insert a job row (queued, or scheduled when delayed); with an idempotency key,
        return the id of the live job that already holds the key instead (nothing inserted).
        ``expires_at``: Celery's ``expires``; a job not started by then ends ``cancelled``.
        ``rerun_finished``: the id of a finished job sent again is a new run of it (as in
        Celery) rather than the same job (see :data:`_INSERT_JOB`). ``correlation_id``: the
        caller's request id (``synth_workers.correlation``). ``maybe_waited=False``: nobody
        can have the id before this row commits (migration 0013).
        """
        self.durable(conn)
        if idempotency_key is not None:
            row = conn.execute(
                "INSERT INTO synth_idempotency (key, job_id, expires_at) "
                "VALUES (%s, %s, now() + make_interval(secs => %s)) "
                "ON CONFLICT (key) DO UPDATE SET job_id = EXCLUDED.job_id, "
                "expires_at = EXCLUDED.expires_at WHERE synth_idempotency.expires_at < now() "
                "RETURNING job_id",
                (idempotency_key, job_id, self.settings.idempotency_window),
            ).fetchone()
            if row is None:
                existing = conn.execute(
                    "SELECT job_id FROM synth_idempotency WHERE key = %s", (idempotency_key,)
                ).fetchone()
                if existing is not None:
                    return str(existing[0])
        scheduled = bool(delay and delay > 0)
        conn.execute(
            self._INSERT_JOB,
            (
                job_id,
                task,
                queue,
                priority,
                arguments_json(payload),
                arguments_json(args) if args else None,
                idempotency_key,
                JobState.SCHEDULED if scheduled else JobState.QUEUED,
                max_attempts,
                scheduled,
                delay or 0,
                published and not scheduled,
                replay_of,
                user_id,
                message_json(message),
                expires_at,
                correlation_id,
                maybe_waited,
                rerun_finished,
                list(FINAL_STATES),
            ),
        )
        if not published and not scheduled:
            conn.execute(_NOTIFY)
        return job_id

    #: One job row. A job id sent again re-opens the row with the new message when the job
    #: was held for its replacement (Celery's ``Task.replace``, :meth:`hold_for_replacement`)
    #: or, with ``rerun_finished``, when it had finished (Celery runs an id sent again: a
    #: frozen canvas applied twice). Any other existing row is the same job sent twice and
    #: stays as it is (the second message is refused at claim). ``rerun_finished`` is off
    #: for sends made by a job's second or later attempt, which may repeat what its first
    #: attempt sent before its worker died: a chain step sent again then is the same job.
    _INSERT_JOB = (
        "INSERT INTO synth_jobs (id, task, queue, priority, payload, args, idempotency_key,"
        " state, max_attempts, run_at, published_at, replay_of, user_id, message, expires_at,"
        " correlation_id, maybe_waited) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, CASE WHEN"
        " %s THEN now() + make_interval(secs => %s) END, CASE WHEN %s THEN now() END, %s, %s,"
        " %s, %s, %s, %s)"
        " ON CONFLICT (id) DO UPDATE SET task = EXCLUDED.task, queue = EXCLUDED.queue,"
        " priority = EXCLUDED.priority, payload = EXCLUDED.payload, args = EXCLUDED.args,"
        " state = EXCLUDED.state, max_attempts = EXCLUDED.max_attempts,"
        " run_at = EXCLUDED.run_at, published_at = EXCLUDED.published_at,"
        " message = EXCLUDED.message, expires_at = EXCLUDED.expires_at, attempt = 0,"
        " correlation_id = coalesce(EXCLUDED.correlation_id, synth_jobs.correlation_id),"
        " maybe_waited = synth_jobs.maybe_waited OR EXCLUDED.maybe_waited,"
        " retries = 0, worker_losses = 0, result = NULL, finished_at = NULL,"
        " started_at = NULL, failure_class = NULL, error_class = NULL, last_error = NULL,"
        " traceback = NULL, error_module = NULL, error_args = NULL, cancel_requested = false,"
        " lease_owner = NULL, lease_expires_at = NULL, enqueued_at = now(), updated_at = now()"
        " WHERE (synth_jobs.state = 'scheduled' AND synth_jobs.run_at = 'infinity')"
        " OR (%s AND synth_jobs.state = ANY(%s))"
    )

    def hold_for_replacement(self, claim: Claim) -> bool:
        """The running job ``claim`` is being replaced (Celery's ``Task.replace``): its row
        waits, never due (``scheduled`` at ``infinity``: PENDING, as Celery reports a
        replaced task), without a lease, until the replacement that inherits its id is sent
        (:meth:`insert_job` re-opens it). Returns whether this owner still held the job."""
        with self.connection() as conn:
            row = conn.execute(
                "UPDATE synth_jobs SET state = %s, run_at = 'infinity', "
                "lease_owner = NULL, lease_expires_at = NULL, published_at = NULL, "
                "updated_at = now() WHERE id = %s AND state = %s AND lease_owner = %s "
                "AND attempt = %s RETURNING id",
                (JobState.SCHEDULED, claim.job_id, JobState.RUNNING, claim.owner, claim.attempt),
            ).fetchone()
        return row is not None

    def adopt(
        self,
        job_id: str,
        task: str,
        queue: str,
        priority: int,
        payload: dict[str, Any],
        args: list[Any] | None,
        run_at: datetime | None = None,
        message: dict[str, Any] | None = None,
        retries: int = 0,
        correlation_id: str | None = None,
    ) -> bool:
        """Give a ledger row to a message sent around the platform (``send_task``, another
        producer), so that it runs like any job; nothing happens when the row exists.

        ``run_at``: the message's ``eta``: the job waits in the ledger (``scheduled``) and
        the sweeper publishes it when due. ``message``: the Celery message as received
        (kept whole for every re-publish); ``retries``: its ``retries`` header;
        ``correlation_id``: the request id it carries. Returns whether a row was written."""
        with self.connection() as conn:
            return (
                conn.execute(
                    "INSERT INTO synth_jobs (id, task, queue, priority, payload, args, state, "
                    "run_at, published_at, message, retries, correlation_id) VALUES (%s, %s, %s,"
                    " %s, %s, %s, %s, %s, CASE WHEN %s THEN NULL ELSE now() END, %s, %s, %s) "
                    "ON CONFLICT (id) DO NOTHING",
                    (
                        job_id,
                        task,
                        queue,
                        priority,
                        arguments_json(payload),
                        arguments_json(args) if args else None,
                        JobState.QUEUED if run_at is None else JobState.SCHEDULED,
                        run_at,
                        run_at is not None,
                        message_json(message),
                        retries,
                        correlation_id,
                    ),
                ).rowcount
                == 1
            )

    def _cancel_unstarted(
        self,
        conn: psycopg.Connection[Any],
        where: sql.Composable,
        params: Sequence[Any],
        states: Sequence[JobState],
        last_error: str,
        *,
        free_keys: bool = False,
    ) -> list[tuple[Any, ...]]:
        """End the jobs matching ``where`` that are in one of ``states`` ``cancelled``, with
        ``last_error``; ``free_keys`` also frees their idempotency keys. Returns their
        ``(id, state, task, queue, attempt)`` rows (announce them once committed)."""
        update = sql.SQL(
            "UPDATE synth_jobs SET state = %s, last_error = %s, finished_at = now(), "
            "updated_at = now() WHERE {where} AND state = ANY(%s) "
            "RETURNING id, state, task, queue, attempt"
        ).format(where=where)
        if free_keys:
            update = sql.SQL(
                "WITH t AS ({update}), k AS (DELETE FROM synth_idempotency i USING t "
                "WHERE i.job_id = t.id) SELECT id, state, task, queue, attempt FROM t"
            ).format(update=update)
        args = (JobState.CANCELLED, last_error, *params, list(states))
        return conn.execute(update, args).fetchall()

    def tombstone_unpublished(self, job_id: str, reason: str) -> bool:
        """An enqueue's publish failed: turn its queued row into a tombstone (cancelled,
        ``last_error`` = ``reason``) and free its idempotency key, so a retry with the same
        key makes a new job. The row is kept, not deleted: a publish that timed out may still
        land once Redis answers, and a message with no row would be adopted and run; against
        the tombstone its claim is refused. False (nothing changed) when the job is no
        longer queued: a worker already claimed it, so the message was published after all.
        """
        with self.connection() as conn, conn.transaction():
            self.durable(conn)
            rows = self._cancel_unstarted(
                conn, sql.SQL("id = %s"), (job_id,), (JobState.QUEUED,), reason, free_keys=True
            )
        if not rows:
            return False
        self._announce_row(EventKind.CANCELLED, job_id, rows[0][1:], reason="publish_failed")
        return True

    def get(self, job_id: str) -> dict[str, Any] | None:
        try:
            uuid.UUID(job_id)
        except ValueError:
            return None
        with self.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            return cur.execute("SELECT * FROM synth_jobs WHERE id = %s", (job_id,)).fetchone()

    def cancel(self, job_id: str) -> str:
        """'cancelled' (never starts), 'requested' (running: asked to stop), 'final' (already
        ended) or 'unknown'."""
        with self.connection() as conn, conn.transaction():
            self.durable(conn)
            row = conn.execute(
                "UPDATE synth_jobs SET state = CASE WHEN state = %(running)s THEN state "
                "ELSE %(cancelled)s END, cancel_requested = true, finished_at = CASE WHEN "
                "state = %(running)s THEN finished_at ELSE now() END, updated_at = now() "
                "WHERE id = %(id)s AND state = ANY(%(unfinished)s) "
                "RETURNING state, task, queue, attempt",
                {
                    "running": JobState.RUNNING,
                    "cancelled": JobState.CANCELLED,
                    "id": job_id,
                    "unfinished": list(UNFINISHED),
                },
            ).fetchone()
            exists = (
                row is not None
                or conn.execute("SELECT 1 FROM synth_jobs WHERE id = %s", (job_id,)).fetchone()
                is not None
            )
        if row is None:
            return "final" if exists else "unknown"
        if row[0] == JobState.RUNNING:
            return "requested"
        self._announce_row(EventKind.CANCELLED, job_id, row)  # once committed
        return "cancelled"

    # --- refused messages ----------------------------------------------------------------
    def record_rejected(
        self, job_id: str | None, task: str, queue: str, raw: str, reason: str, error: str
    ) -> str:
        """A message a worker refused (``synth_workers.screening``): dead-letter it with
        failure class ``rejected_message`` and ``reason`` as its error class; an existing
        live row of that id ends so. ``raw``: the message's first bytes, as text."""
        from synth_workers.ledger.refusals import Refusal

        return self.record_rejected_many([Refusal(job_id, task, queue, raw, reason, error)])[0]

    def record_rejected_many(self, refusals: Sequence[Refusal]) -> list[str]:
        """Dead-letter refused messages in one statement (see :meth:`record_rejected`);
        returns the row id given to each. A message whose id is not a UUID gets a new one;
        one whose job already runs or ended changes nothing."""
        rows: dict[str, Refusal] = {}
        ids: list[str] = []
        for refusal in refusals:
            try:
                row_id = str(uuid.UUID(str(refusal.job_id)))
            except ValueError:
                row_id = str(uuid.uuid4())
            ids.append(row_id)
            rows.setdefault(row_id, refusal)  # one row can be written once per statement
        with self.connection() as conn:
            written = conn.execute(
                _REJECT,
                {
                    "dead": JobState.DEAD,
                    "rejected": FailureClass.REJECTED_MESSAGE,
                    "ids": list(rows),
                    "tasks": [clip_text(r.task, 500) for r in rows.values()],
                    "queues": [clip_text(r.queue, 500) for r in rows.values()],
                    "payloads": [
                        Jsonb({"raw": clip_text(r.raw, RESULT_LIMIT_BYTES)}) for r in rows.values()
                    ],
                    "reasons": [clip_text(r.reason, 100) for r in rows.values()],
                    "errors": [clip_text(r.detail, 4000) for r in rows.values()],
                    "settled": [*FINAL_STATES, JobState.RUNNING],
                },
            ).fetchall()
        if self.lifecycle.listening:
            for (row_id,) in written:
                r = rows[str(row_id)]
                self.lifecycle.announce(
                    EventKind.DEAD,
                    str(row_id),
                    task=clip_text(r.task, 500),
                    queue=clip_text(r.queue, 500),
                    data={
                        "failure_class": FailureClass.REJECTED_MESSAGE,
                        "error_class": r.reason,
                        "reason": r.reason,
                    },
                )
        return ids

    # --- effect guard --------------------------------------------------------------------
    def effect_recorded(self, job_id: str, key: str) -> bool:
        with self.connection() as conn:
            return (
                conn.execute(
                    "SELECT 1 FROM synth_effects WHERE job_id = %s AND key = %s", (job_id, key)
                ).fetchone()
                is not None
            )

    def record_effect(self, job_id: str, key: str, detail: Any = None) -> bool:
        with self.connection() as conn:
            return (
                conn.execute(
                    "INSERT INTO synth_effects (job_id, key, detail) VALUES (%s, %s, %s) "
                    "ON CONFLICT DO NOTHING",
                    (job_id, key, encode_result(detail)),
                ).rowcount
                == 1
            )
