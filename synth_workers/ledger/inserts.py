"""Bulk enqueue's statement: many jobs of one task in one multi-row ``INSERT``, their
idempotency keys claimed in the same statement (so one call is one round trip, and all or
nothing)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from synth_workers.ledger.early import EARLY_REASON, REVIVE
from synth_workers.ledger.rows import NOTIFY_CHANNEL, LedgerRows
from synth_workers.states import JobState

_NOTIFY = sql.SQL("NOTIFY {}").format(sql.Identifier(NOTIFY_CHANNEL))

#: The rows, column by column (``WITH ORDINALITY``: ``n`` is the input order).
_ROWS = sql.SQL(
    "SELECT * FROM unnest(%(ids)b::uuid[], %(keys)b::text[], %(payloads)b::jsonb[], "
    "%(args)b::jsonb[], %(messages)b::jsonb[]) WITH ORDINALITY AS v(id, key, payload, args, "
    "message, n)"
)
#: What every row of one call shares.
_COLUMNS = sql.SQL(
    "INSERT INTO synth_jobs (id, task, queue, priority, payload, args, idempotency_key, state,"
    " max_attempts, run_at, published_at, user_id, message, correlation_id, maybe_waited)"
    " SELECT v.id, %(task)s, %(queue)s, %(priority)s, v.payload, v.args, v.key, %(state)s,"
    " %(max_attempts)s, CASE WHEN %(scheduled)s THEN now() + make_interval(secs => %(delay)s)"
    " END, CASE WHEN %(published)s THEN now() END, %(user_id)s, v.message, %(correlation_id)s,"
    " %(maybe_waited)s FROM v"
)
#: Without keys: the rows, inserted.
_INSERT = sql.SQL("WITH v AS ({rows}) {columns}").format(rows=_ROWS, columns=_COLUMNS)
#: With keys: a key free (or expired) is taken by its row, which is inserted; a key a live
#: job holds inserts nothing and answers that job's id (``NULL``: taken by a transaction
#: not visible yet to this statement; the caller looks again).
_INSERT_KEYED = sql.SQL(
    "WITH v AS ({rows}), k AS (INSERT INTO synth_idempotency (key, job_id, expires_at)"
    " SELECT v.key, v.id, now() + make_interval(secs => %(window)s) FROM v"
    " WHERE v.key IS NOT NULL ON CONFLICT (key) DO UPDATE SET job_id = EXCLUDED.job_id,"
    " expires_at = EXCLUDED.expires_at WHERE synth_idempotency.expires_at < now()"
    " RETURNING key, job_id), j AS ({columns} WHERE v.key IS NULL"
    " OR v.key IN (SELECT key FROM k))"
    " SELECT CASE WHEN v.key IS NULL OR k.key IS NOT NULL THEN v.id ELSE e.job_id END"
    " FROM v LEFT JOIN k ON k.key = v.key"
    " LEFT JOIN synth_idempotency e ON e.key = v.key AND k.key IS NULL ORDER BY v.n"
).format(rows=_ROWS, columns=_COLUMNS)


#: Without keys, published while the rows are written (``synth_workers.ledger.early``): a
#: worker's tombstone for one of the ids is revived; answers the revived rows' ids.
_INSERT_EARLY = sql.SQL(
    "WITH v AS ({rows}), i AS ({columns} ON CONFLICT (id) DO UPDATE SET {revive}"
    " AND synth_jobs.last_error = %(reason)s RETURNING id, xmax)"
    " SELECT id FROM i WHERE xmax::text <> '0'"
).format(rows=_ROWS, columns=_COLUMNS, revive=sql.SQL(REVIVE))


class Inserts(LedgerRows):
    """Writes many new job rows at once."""

    def insert_jobs(
        self,
        conn: psycopg.Connection[Any],
        *,
        task: str,
        queue: str,
        priority: int,
        max_attempts: int | None,
        delay: float | None,
        published: bool,
        user_id: str | None,
        correlation_id: str | None,
        ids: Sequence[str],
        keys: Sequence[str | None],
        payloads: Sequence[str],
        args: Sequence[str | None],
        messages: Sequence[str | None],
    ) -> list[str | None]:
        """Insert new jobs of ``task`` (fresh ids; the columns as JSON text) in one statement;
        returns, per row in order, its job's id: its own, or that of the live job already
        holding its idempotency key (nothing inserted for it); ``None`` when a concurrent
        transaction holds the key and is not visible yet. Keys must differ within a call.
        Durable in worker processes when ``conn`` is in a transaction."""
        if not self.durable_commits and conn.info.transaction_status != 0:
            self.durable(conn)
        params = self._rows_params(
            task, queue, priority, max_attempts, delay, published, user_id, correlation_id
        )
        params.update(ids=list(ids), keys=list(keys), payloads=list(payloads), args=list(args))
        params["messages"] = list(messages)
        scheduled = params["scheduled"]
        if any(key is not None for key in keys):
            # binary: arrays of JSON text go without text-array escaping
            rows = conn.execute(_INSERT_KEYED, params).fetchall()
            found: list[str | None] = [None if r[0] is None else str(r[0]) for r in rows]
        else:
            conn.execute(_INSERT, params)
            found = list(ids)
        if not published and not scheduled:
            conn.execute(_NOTIFY)
        return found

    def send_jobs_early(
        self,
        conn: psycopg.Connection[Any],
        *,
        task: str,
        queue: str,
        priority: int,
        max_attempts: int | None,
        user_id: str | None,
        correlation_id: str | None,
        ids: Sequence[str],
        payloads: Sequence[str],
        args: Sequence[str | None],
        messages: Sequence[str],
    ) -> psycopg.Cursor[Any]:
        """On ``conn`` in pipeline mode: send new queued jobs of ``task`` (fresh ids, no
        keys), published now, without waiting (``synth_workers.ledger.early``). A row whose
        id a worker's tombstone holds revives it; once the pipeline is synced, the cursor
        gives those rows' ids (their messages were dropped: publish them again)."""
        params = self._rows_params(
            task, queue, priority, max_attempts, None, True, user_id, correlation_id
        )
        params.update(ids=list(ids), keys=[None] * len(ids), payloads=list(payloads))
        params.update(args=list(args), messages=list(messages), reason=EARLY_REASON)
        return conn.execute(_INSERT_EARLY, params)

    def _rows_params(
        self,
        task: str,
        queue: str,
        priority: int,
        max_attempts: int | None,
        delay: float | None,
        published: bool,
        user_id: str | None,
        correlation_id: str | None,
    ) -> dict[str, Any]:
        """What every row of one statement shares (:data:`_COLUMNS`' named parameters)."""
        scheduled = bool(delay and delay > 0)
        return {
            "task": task,
            "queue": queue,
            "priority": priority,
            "state": JobState.SCHEDULED if scheduled else JobState.QUEUED,
            "max_attempts": max_attempts,
            "scheduled": scheduled,
            "delay": delay or 0,
            "published": published and not scheduled,
            "user_id": user_id,
            "correlation_id": correlation_id,
            # the ids are known to no one before the call returns, unless in the caller's
            # transaction (outbox): migration 0013
            "maybe_waited": not published,
            "window": self.settings.idempotency_window,
        }

    def idempotency_holders(
        self, conn: psycopg.Connection[Any], keys: Sequence[str]
    ) -> dict[str, str]:
        """The jobs now holding ``keys`` (live or not)."""
        rows = conn.execute(
            "SELECT key, job_id FROM synth_idempotency WHERE key = ANY(%s)", (list(keys),)
        ).fetchall()
        return {str(k): str(j) for k, j in rows}
