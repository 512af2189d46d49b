"""A single enqueue's row, written while its message is published: the two round trips
overlap instead of following one another.

A plain send (a fresh id, no idempotency key, no delay, not in the caller's transaction, a
message :func:`synth_workers.wire.build` makes) sends its row's ``INSERT`` (autocommit,
durable) with :func:`send_insert`, publishes its message without waiting for the answer,
then waits for it (:meth:`PendingInsert.result`). It returns only once both are done, so the
promise is unchanged: a job the enqueue acknowledged is committed in the ledger.

The message can then reach a worker before its row commits (rarely: a worker's own path
from Redis to its claim is longer than the commit), or for a row that never commits
(Postgres failed, and the enqueue raised). Such a message carries :data:`EARLY` in its
properties, and a worker that finds no row for it does not adopt it as a job sent around
the platform: it calls :func:`tombstone_early`, an ``INSERT ... ON CONFLICT DO NOTHING`` of a
tombstone that waits for the enqueue's own ``INSERT`` while that is still in flight.

- The enqueue's row committed: the tombstone is not written, and the worker claims the job.
- The enqueue's row never commits: the tombstone stays, and the message is dropped. A job
  whose enqueue raised never runs.
- The enqueue's ``INSERT`` reached Postgres after the tombstone: its statement revives the
  tombstone as the queued job. :meth:`PendingInsert.result` returns ``True``, and the
  enqueue publishes the message again. The job runs once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from psycopg import errors, generators, postgres, pq

from synth_workers import jsonfast
from synth_workers.states import JobState

#: The message property that marks a message published before its row committed.
EARLY = "synth_early"
#: ``last_error`` of a tombstone a worker wrote for such a message.
EARLY_REASON = (
    "its message reached a worker before its ledger row: the enqueue had not committed the "
    "row (it failed, or had not yet)"
)

_VALUES = (
    "job_id",
    "task",
    "queue",
    "priority",
    "payload",
    "args",
    "max_attempts",
    "user_id",
    "message",
    "expires_at",
    "correlation_id",
    "maybe_waited",
)
#: Over a worker's tombstone (the ``SET`` of ``ON CONFLICT (id) DO UPDATE``, then its
#: ``WHERE``, to which the statement adds ``AND synth_jobs.last_error =`` :data:`EARLY_REASON`):
#: the row revived as the enqueue wrote it.
REVIVE = (
    "task = EXCLUDED.task, queue = EXCLUDED.queue, priority = EXCLUDED.priority,"
    " payload = EXCLUDED.payload, args = EXCLUDED.args, state = EXCLUDED.state,"
    " idempotency_key = EXCLUDED.idempotency_key, max_attempts = EXCLUDED.max_attempts,"
    " run_at = EXCLUDED.run_at, published_at = now(), user_id = EXCLUDED.user_id,"
    " message = EXCLUDED.message, expires_at = EXCLUDED.expires_at,"
    " correlation_id = EXCLUDED.correlation_id, maybe_waited = EXCLUDED.maybe_waited,"
    " finished_at = NULL, last_error = NULL, enqueued_at = now(), updated_at = now()"
    " WHERE synth_jobs.state = 'cancelled'"
)
#: The row (``$1`` … in :data:`_VALUES`' order, ``$13`` :data:`EARLY_REASON`), reviving a
#: worker's tombstone for it. Answers whether it revived one.
_INSERT = (
    "INSERT INTO synth_jobs (id, task, queue, priority, payload, args, state,"  # noqa: S608
    " max_attempts, published_at, user_id, message, expires_at, correlation_id, maybe_waited)"
    " VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, now(), $8, $9, $10, $11, $12)"
    f" ON CONFLICT (id) DO UPDATE SET {REVIVE} AND synth_jobs.last_error = $13"
    " RETURNING xmax::text <> '0'"
).encode()
#: Its parameters' types (prepared once per connection, every value sent as text).
_NAMES = "uuid text text int2 jsonb jsonb int4 text jsonb timestamptz text bool text"
_TYPES = [postgres.types[name].oid for name in _NAMES.split()]
_REASON = EARLY_REASON.encode()
_TOMBSTONE = (
    "INSERT INTO synth_jobs (id, task, queue, priority, payload, state, finished_at,"
    " last_error) VALUES (%s, %s, %s, %s, '{}', %s, now(), %s) ON CONFLICT (id) DO NOTHING"
)


class PendingInsert:
    """A row's ``INSERT`` sent on ``conn`` and not yet answered; nothing else may use
    ``conn`` before :meth:`result`."""

    __slots__ = ("_conn", "_row")

    def __init__(self, conn: psycopg.Connection[Any], row: Mapping[str, Any]) -> None:
        self._conn, self._row = conn, row

    def result(self) -> bool:
        """Wait for the answer; raise what Postgres raised (the row is not committed then).
        ``True``: the row revived a worker's tombstone (the worker dropped the message)."""
        conn = self._conn
        try:
            return _answer(conn)
        except errors.InvalidSqlStatementName:
            # psycopg deallocates every statement after a ROLLBACK on the connection
            conn._synth_early = None  # type: ignore[attr-defined]
            return send_insert(conn, self._row).result()


def _answer(conn: psycopg.Connection[Any]) -> bool:
    results = conn.wait(generators.fetch_many(conn.pgconn))
    for res in results:
        if res.status == pq.ExecStatus.FATAL_ERROR:
            raise errors.error_from_result(res, encoding=conn.info.encoding)
    last = results[-1] if results else None
    return last is not None and last.ntuples == 1 and last.get_value(0, 0) == b"t"


def send_insert(conn: psycopg.Connection[Any], row: Mapping[str, Any]) -> PendingInsert:
    """Send the queued row of ``row`` (``publish.send``'s, published now) on ``conn``, an idle
    autocommit connection, and return at once. The statement is prepared on ``conn`` the
    first time (one round trip, once per connection)."""
    pgconn = conn.pgconn
    if pgconn.transaction_status != pq.TransactionStatus.IDLE:
        raise psycopg.ProgrammingError("send_insert needs an idle autocommit connection")
    if getattr(conn, "_synth_early", None) is not pgconn:
        # a protocol-level statement (a pooler that keeps prepared statements sees it)
        pgconn.send_prepare(b"synth_early_insert", _INSERT, param_types=_TYPES)
        for res in conn.wait(generators.execute(pgconn)):
            if res.status == pq.ExecStatus.FATAL_ERROR:
                raise errors.error_from_result(res, encoding=conn.info.encoding)
        conn._synth_early = pgconn  # type: ignore[attr-defined]
    pgconn.send_query_prepared(b"synth_early_insert", _params(row))
    conn.wait(generators.send(pgconn))
    return PendingInsert(conn, row)


def _params(row: Mapping[str, Any]) -> list[bytes | None]:
    """:data:`_VALUES` of ``row``, and :data:`EARLY_REASON`, as Postgres's text input."""
    expires = row["expires_at"]
    args = row["args"]
    return [
        row["job_id"].encode(),
        row["task"].encode(),
        row["queue"].encode(),
        b"%d" % row["priority"],
        jsonfast.dumps(row["payload"]).encode(),
        jsonfast.dumps(args).encode() if args else None,
        None if row["max_attempts"] is None else b"%d" % row["max_attempts"],
        _text(row["user_id"]),
        jsonfast.dumps(row["message"]).encode(),
        None if expires is None else expires.isoformat().encode(),
        _text(row["correlation_id"]),
        b"t" if row["maybe_waited"] else b"f",
        _REASON,
    ]


def _text(value: str | None) -> bytes | None:
    return None if value is None else value.encode()


def tombstone_early(ledger: Any, job_id: str, task: str, queue: str, priority: int) -> bool:
    """A worker holds message ``job_id``, marked :data:`EARLY`, and found no row for it:
    write a tombstone unless the enqueue's row commits (waiting for it while its ``INSERT``
    is in flight). ``True``: the tombstone was written (drop the message); ``False``: the row
    is there (claim it)."""
    with ledger.connection() as conn:
        cur = conn.execute(
            _TOMBSTONE, (job_id, task, queue, priority, JobState.CANCELLED, EARLY_REASON)
        )
        return bool(cur.rowcount == 1)
