"""The Postgres job ledger: every job's row, and every state change as one fenced statement.

A worker *claims* a queued job (``attempt + 1`` is the fencing token and ``lease_owner`` its
process), renews the leases of all its running jobs in one statement per tick, and finishes
a job only while its attempt and lease still hold; a refused late finish is recorded in
``synth_late_completions``. Connections come from a per-process pool (opened lazily, so
prefork children never share a parent's sockets). Tables live in ``SYNTH_DB_SCHEMA``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from celery.result import AsyncResult, GroupResult
from kombu.utils import json as kombu_json
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool
from psycopg_pool.errors import PoolClosed, PoolTimeout, TooManyRequests

from synth_workers.errors import ConfigurationError, ServiceUnavailableError
from synth_workers.lifecycle import Lifecycle
from synth_workers.settings import Settings, mask_url

if TYPE_CHECKING:
    from synth_workers.ledger.refusals import Refusal

FINAL_STATES = ("succeeded", "dead", "cancelled")
RESULT_LIMIT_BYTES = 64 * 1024
NOTIFY_CHANNEL = "synth_outbox"


@dataclass(frozen=True)
class Claim:
    """A job a worker now runs: its fencing token is ``attempt``."""

    job_id: str
    attempt: int
    max_attempts: int | None
    owner: str
    task: str | None = None
    queue: str | None = None
    user_id: str | None = None
    #: Unix times: when the job was enqueued, and when this attempt was claimed.
    enqueued_at: float | None = None
    claimed_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Publishable:
    """What the transport needs to (re)publish a job."""

    id: str
    task: str
    queue: str
    priority: int
    payload: dict[str, Any]
    args: list[Any] | None = None
    #: The Celery message as sent (``synth_workers.message``); ``None`` for older rows.
    message: dict[str, Any] | None = None
    #: Celery's ``request.retries`` for the next run.
    retries: int = 0

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Publishable:
        """From ``RETURNING id, task, queue, priority, payload, args, message, retries``."""
        return cls(str(row[0]), row[1], row[2], row[3], row[4], row[5], row[6], int(row[7]))


def message_json(message: dict[str, Any] | None) -> Jsonb | None:
    """A Celery message for its jsonb column: kombu's JSON encoder, so dates and UUIDs in
    signatures are written the way kombu reads them back when the message is re-sent."""
    return None if message is None else Jsonb(message, dumps=kombu_json.dumps)


def _text(value: Any, limit: int) -> str:
    """``value`` as text Postgres takes (no NUL, no lone surrogate), at most ``limit`` long."""
    text = value if isinstance(value, str) else repr(value)
    text = text[:limit].replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def is_connection_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means Postgres could not be reached or the connection broke (report it
    as :class:`ServiceUnavailableError`), as opposed to an error of the statement itself.

    Connection failures: SQLSTATE class 08 (connection exception), 57P0x (server shut down,
    crashed, not accepting connections yet, database dropped, idle session timed out), an
    ``OperationalError`` with no SQLSTATE (libpq could not connect, the socket broke, the
    connection is closed), and the pool giving no connection (timeout, closed, overloaded).
    Everything else, e.g. ``ProgramLimitExceeded`` ("index row requires 12024 bytes") or
    ``QueryCanceled``, which psycopg also files under ``OperationalError``, is not.
    """
    if isinstance(exc, (PoolTimeout, PoolClosed, TooManyRequests)):
        return True
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = exc.sqlstate
    if sqlstate is None:
        return isinstance(exc, psycopg.OperationalError)
    return sqlstate.startswith(("08", "57P0"))


def encode_result(result: Any) -> Jsonb:
    if isinstance(
        result, AsyncResult | GroupResult
    ):  # a task returning a result: Celery stores its tuple
        result = result.as_tuple()
    try:
        text = json.dumps(result, default=str)
    except (TypeError, ValueError):
        text = json.dumps(repr(result))
    if len(text) > RESULT_LIMIT_BYTES:
        return Jsonb({"truncated": True, "bytes": len(text)})
    return Jsonb(json.loads(text))


def _exception_origin(exc: BaseException | None, error_class: str) -> tuple[str | None, Any]:
    """``exc``'s module and its arguments as JSON (``None`` when they do not encode). Without
    ``exc``, the exception being handled (or the one it wraps: ``exc``, ``__cause__``,
    ``__context__``) whose class is named ``error_class``; ``(None, None)`` when none is."""
    if exc is None:
        handled = sys.exc_info()[1]
        candidates = (
            handled,
            getattr(handled, "exc", None),
            getattr(handled, "__cause__", None),
            getattr(handled, "__context__", None),
        )
        exc = next(
            (
                c
                for c in candidates
                if isinstance(c, BaseException) and type(c).__name__ == error_class
            ),
            None,
        )
    if exc is None:
        return None, None
    try:
        args = Jsonb(json.loads(json.dumps(list(exc.args))))
    except (TypeError, ValueError):
        args = None
    return type(exc).__module__, args


class Ledger:
    """Reads and writes the job ledger."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: Told of every state change this process commits (see ``synth_workers.lifecycle``).
        self.lifecycle = Lifecycle()
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._pid = 0
        self._lock = threading.Lock()
        # A forked child (prefork pool) must not touch the parent's pool or a lock another
        # thread held at fork time: it starts afresh. The parent's pool object is kept
        # referenced, never closed from the child (its sockets belong to the parent).
        self._inherited: list[object] = []
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        if self._pool is not None:
            self._inherited.append(self._pool)
        self._pool = None
        self._pid = 0

    # --- connections ---------------------------------------------------------------------
    @property
    def conninfo(self) -> str:
        url = self.settings.database_url
        if not url:
            raise ConfigurationError(
                "DATABASE_URL is not set: the job ledger needs Postgres. Set DATABASE_URL "
                "(postgresql://user:password@host:5432/db), or run `synth-workers dev` for an "
                "embedded one."
            )
        return url

    #: False in worker processes: state transitions commit without waiting for the WAL
    #: flush (a Postgres crash can only make a job run again: at least once), while
    #: enqueues, effect transactions and cancellations still commit durably.
    durable_commits = True

    def use_fast_commits(self) -> None:
        """Worker processes: asynchronous commits for claims, renewals and completions."""
        self.durable_commits = False
        self._after_fork()

    def connect_kwargs(self, durable: bool = True) -> dict[str, Any]:
        options = f"-c search_path={self.settings.db_schema}"
        if not durable:
            options += " -c synchronous_commit=off"
        return {"options": options, "connect_timeout": 5}

    def durable(self, conn: psycopg.Connection[Any]) -> None:
        """Make the open transaction on ``conn`` commit durably (worker processes)."""
        if not self.durable_commits:
            conn.execute("SET LOCAL synchronous_commit = on")

    @property
    def pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        pid = os.getpid()
        if self._pool is None or self._pid != pid:
            with self._lock:
                if self._pool is None or self._pid != pid:
                    self._pool = ConnectionPool(
                        self.conninfo,
                        min_size=1,
                        max_size=self.settings.db_pool_size,
                        kwargs={**self.connect_kwargs(self.durable_commits), "autocommit": True},
                        open=False,
                        name=f"synth-ledger-{pid}",
                    )
                    try:
                        self._pool.open(wait=True, timeout=10)
                    except Exception as exc:
                        self._pool = None
                        raise self._unavailable(exc) from exc
                    self._pid = pid
        return self._pool

    def _unavailable(self, exc: BaseException) -> ServiceUnavailableError:
        return ServiceUnavailableError(
            f"Postgres is not reachable at {mask_url(self.settings.database_url)} "
            f"(DATABASE_URL): {exc}. Start it, or run `synth-workers dev` for the embedded stack."
        )

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; a connection failure (only that: see
        :func:`is_connection_failure`) is raised as :class:`ServiceUnavailableError`."""
        try:
            with self.pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as exc:
            if not is_connection_failure(exc):
                raise
            raise self._unavailable(exc) from exc

    def connect(self) -> psycopg.Connection[Any]:
        """A dedicated connection (LISTEN, long transactions), not from the pool."""
        try:
            return psycopg.connect(self.conninfo, autocommit=True, **self.connect_kwargs())
        except psycopg.OperationalError as exc:
            if not is_connection_failure(exc):
                raise
            raise self._unavailable(exc) from exc

    def close(self) -> None:
        if self._pool is not None and self._pid == os.getpid():
            self._pool.close()
        self._pool = None

    # --- schema --------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        """Apply the SQL migrations not yet applied; return their names."""
        schema = self.settings.db_schema
        files = sorted(
            (
                p
                for p in resources.files("synth_workers.ledger.migrations").iterdir()
                if p.name.endswith(".sql")
            ),
            key=lambda p: p.name,
        )
        applied: list[str] = []
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('synth_migrations'))")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS synth_schema_migrations "
                    "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {r[0] for r in conn.execute("SELECT name FROM synth_schema_migrations")}
                for file in files:
                    if file.name in done:
                        continue
                    conn.execute(file.read_text().encode())
                    conn.execute(
                        "INSERT INTO synth_schema_migrations (name) VALUES (%s)", (file.name,)
                    )
                    applied.append(file.name)
        return applied

    # --- enqueue -------------------------------------------------------------------------
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
    ) -> str:
        """Insert a job row (queued, or scheduled when delayed); with an idempotency key,
        return the id of the live job that already holds the key instead (nothing inserted).
        ``expires_at``: Celery's ``expires``; a job not started by then ends ``cancelled``.
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
                Jsonb(payload),
                Jsonb(args) if args else None,
                idempotency_key,
                "scheduled" if scheduled else "queued",
                max_attempts,
                scheduled,
                delay or 0,
                published and not scheduled,
                replay_of,
                user_id,
                message_json(message),
                expires_at,
            ),
        )
        if not published and not scheduled:
            conn.execute(f"NOTIFY {NOTIFY_CHANNEL}")
        return job_id

    #: One job row. A job id sent again: the row of a job held for its replacement (Celery's
    #: ``Task.replace``, :meth:`hold_for_replacement`) is re-opened with the new message;
    #: any other existing row is the same job sent twice and stays as it is (the second
    #: message is refused at claim: the job is no longer queued).
    _INSERT_JOB = (
        "INSERT INTO synth_jobs (id, task, queue, priority, payload, args, idempotency_key,"
        " state, max_attempts, run_at, published_at, replay_of, user_id, message, expires_at)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, CASE WHEN %s THEN now() +"
        " make_interval(secs => %s) END, CASE WHEN %s THEN now() END, %s, %s, %s, %s)"
        " ON CONFLICT (id) DO UPDATE SET task = EXCLUDED.task, queue = EXCLUDED.queue,"
        " priority = EXCLUDED.priority, payload = EXCLUDED.payload, args = EXCLUDED.args,"
        " state = EXCLUDED.state, max_attempts = EXCLUDED.max_attempts,"
        " run_at = EXCLUDED.run_at, published_at = EXCLUDED.published_at,"
        " message = EXCLUDED.message, expires_at = EXCLUDED.expires_at, attempt = 0,"
        " retries = 0, worker_losses = 0, updated_at = now()"
        " WHERE synth_jobs.state = 'scheduled' AND synth_jobs.run_at = 'infinity'"
    )

    def hold_for_replacement(self, claim: Claim) -> bool:
        """The running job ``claim`` is being replaced (Celery's ``Task.replace``): its row
        waits, never due (``scheduled`` at ``infinity``: PENDING, as Celery reports a
        replaced task), without a lease, until the replacement that inherits its id is sent
        (:meth:`insert_job` re-opens it). Returns whether this owner still held the job."""
        with self.connection() as conn:
            row = conn.execute(
                "UPDATE synth_jobs SET state = 'scheduled', run_at = 'infinity', "
                "lease_owner = NULL, lease_expires_at = NULL, published_at = NULL, "
                "updated_at = now() WHERE id = %s AND state = 'running' AND lease_owner = %s "
                "AND attempt = %s RETURNING id",
                (claim.job_id, claim.owner, claim.attempt),
            ).fetchone()
        return row is not None

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
            row = conn.execute(
                "WITH t AS (UPDATE synth_jobs SET state = 'cancelled', last_error = %s, "
                "finished_at = now(), updated_at = now() WHERE id = %s AND state = 'queued' "
                "RETURNING id, state, task, queue, attempt), "
                "k AS (DELETE FROM synth_idempotency i USING t WHERE i.job_id = t.id) "
                "SELECT state, task, queue, attempt FROM t",
                (reason, job_id),
            ).fetchone()
        if row is None:
            return False
        self._announce_row("cancelled", job_id, row, reason="publish_failed")
        return True

    # --- worker: claim, lease, finish ----------------------------------------------------
    _CLAIM = (
        "UPDATE synth_jobs SET state = 'running', attempt = attempt + 1, "
        "lease_owner = %s, lease_expires_at = now() + make_interval(secs => %s), "
        "started_at = now(), updated_at = now() "
        "WHERE id = %s AND state = 'queued' AND NOT cancel_requested "
        "AND (expires_at IS NULL OR expires_at > now()) "
        "RETURNING attempt, max_attempts, task, queue, user_id, extract(epoch FROM enqueued_at)"
    )
    _COMPLETE = (
        "UPDATE synth_jobs j SET state = 'succeeded', result = v.result, "
        "finished_at = now(), lease_owner = NULL, lease_expires_at = NULL, "
        "updated_at = now() FROM (SELECT unnest(%s::uuid[]) AS id, "
        "unnest(%s::int[]) AS attempt, unnest(%s::text[]) AS owner, "
        "unnest(%s::jsonb[]) AS result) v WHERE j.id = v.id AND j.attempt = v.attempt "
        "AND j.lease_owner = v.owner AND j.state = 'running' RETURNING j.id"
    )

    _COMPLETE_AND_CLAIM = (
        f"WITH done AS ({_COMPLETE}), claimed AS ({_CLAIM}) "  # noqa: S608 - constants
        "SELECT c.*, (SELECT coalesce(array_agg(id), '{}') FROM done) "
        "FROM (SELECT 1) one LEFT JOIN claimed c ON true"
    )

    @staticmethod
    def _completion_params(done: Sequence[tuple[Claim, Any]]) -> tuple[list[Any], ...]:
        return (
            [c.job_id for c, _ in done],
            [c.attempt for c, _ in done],
            [c.owner for c, _ in done],
            [encode_result(r) for _, r in done],
        )

    def claim(
        self, job_id: str, owner: str, complete: Sequence[tuple[Claim, Any]] = ()
    ) -> Claim | None:
        """Take a queued job for ``owner``; ``None`` when it is not queued (already taken,
        finished, cancelled, or not due). ``complete``: finished jobs of this process whose
        fenced completion rides along in the same statement (one round trip per job)."""
        if not complete:
            with self.connection() as conn:
                row = conn.execute(
                    self._CLAIM, (owner, self.settings.lease_seconds, job_id)
                ).fetchone()
        else:
            with self.connection() as conn:
                row = conn.execute(
                    self._COMPLETE_AND_CLAIM,
                    (
                        *self._completion_params(complete),
                        owner,
                        self.settings.lease_seconds,
                        job_id,
                    ),
                ).fetchone()
            assert row is not None
            self._late_unless({str(i) for i in row[6]}, complete)
            if row[0] is None:
                return None
        if row is None:
            return None
        claim = Claim(
            job_id,
            int(row[0]),
            row[1],
            owner,
            task=row[2],
            queue=row[3],
            user_id=row[4],
            enqueued_at=float(row[5]),
        )
        if self.lifecycle.listening:
            self.lifecycle.announce(
                "started",
                job_id,
                **self.about(claim),
                data={"queue_wait": max(0.0, claim.claimed_at - float(row[5]))},
            )
        return claim

    @staticmethod
    def about(claim: Claim) -> dict[str, Any]:
        """The fields a lifecycle announcement about ``claim``'s job carries."""
        return {
            "task": claim.task,
            "queue": claim.queue,
            "attempt": claim.attempt,
            "user_id": claim.user_id,
        }

    def announce_finish(self, claim: Claim, kind: str, **data: Any) -> None:
        if self.lifecycle.listening:
            data.setdefault("runtime", max(0.0, time.time() - claim.claimed_at))
            self.lifecycle.announce(kind, claim.job_id, **self.about(claim), data=data)

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
    ) -> bool:
        """Give a ledger row to a message sent around the platform (``send_task``, another
        producer), so that it runs like any job; nothing happens when the row exists.

        ``run_at``: the message's ``eta``: the job waits in the ledger (``scheduled``) and
        the sweeper publishes it when due. ``message``: the Celery message as received
        (kept whole for every re-publish); ``retries``: its ``retries`` header. Returns
        whether a row was written."""
        with self.connection() as conn:
            return (
                conn.execute(
                    "INSERT INTO synth_jobs (id, task, queue, priority, payload, args, state, "
                    "run_at, published_at, message, retries) VALUES (%s, %s, %s, %s, %s, %s, %s,"
                    " %s, CASE WHEN %s THEN NULL ELSE now() END, %s, %s) "
                    "ON CONFLICT (id) DO NOTHING",
                    (
                        job_id,
                        task,
                        queue,
                        priority,
                        Jsonb(payload),
                        Jsonb(args) if args else None,
                        "queued" if run_at is None else "scheduled",
                        run_at,
                        run_at is not None,
                        message_json(message),
                        retries,
                    ),
                ).rowcount
                == 1
            )

    def _late_unless(self, completed: set[str], done: Sequence[tuple[Claim, Any]]) -> None:
        for claim, _ in done:
            if claim.job_id not in completed:
                self.record_late(claim, "succeeded")
            else:
                self.announce_finish(claim, "succeeded")

    def renew(self, owner: str) -> list[tuple[str, bool]]:
        """Extend every lease ``owner`` holds, in one statement; return (job, cancel asked)."""
        with self.connection() as conn:
            rows = conn.execute(
                "UPDATE synth_jobs SET lease_expires_at = now() + make_interval(secs => %s) "
                "WHERE lease_owner = %s AND state = 'running' RETURNING id, cancel_requested",
                (self.settings.lease_seconds, owner),
            ).fetchall()
        return [(str(r[0]), bool(r[1])) for r in rows]

    _FENCE = "id = %s AND attempt = %s AND lease_owner = %s AND state = 'running'"

    def lock_claim(self, conn: psycopg.Connection[Any], claim: Claim) -> bool:
        """Lock the job's row in ``conn``'s transaction if ``claim`` still holds."""
        row = conn.execute(
            f"SELECT 1 FROM synth_jobs WHERE {self._FENCE} FOR UPDATE",  # noqa: S608
            (claim.job_id, claim.attempt, claim.owner),
        ).fetchone()
        return row is not None

    def succeed(
        self, claim: Claim, result: Any, conn: psycopg.Connection[Any] | None = None
    ) -> bool:
        return self._finish(
            claim,
            "succeeded",
            "state = 'succeeded', result = %s, finished_at = now()",
            (encode_result(result),),
            conn,
            event=("succeeded", {}),
        )

    def succeed_many(self, done: Sequence[tuple[Claim, Any]]) -> set[str]:
        """Fenced completion of several jobs in one statement; returns the ids completed.
        The others were refused (lease lost) and are recorded as late."""
        if not done:
            return set()
        with self.connection() as conn:
            rows = conn.execute(self._COMPLETE, self._completion_params(done)).fetchall()
        completed = {str(r[0]) for r in rows}
        self._late_unless(completed, done)
        return completed

    def retry_later(
        self, claim: Claim, delay: float, error: BaseException, failure_class: str
    ) -> bool:
        """The attempt failed: run it again in ``delay`` seconds, unless the job was
        cancelled meanwhile or expires before then (it ends ``cancelled``)."""
        if self.cancel_if_requested(claim, delay):
            return True
        return self._finish(
            claim,
            "failed-retrying",
            "state = 'failed-retrying', run_at = now() + make_interval(secs => %s), "
            "retries = retries + 1, failure_class = %s, error_class = %s, last_error = %s",
            (delay, failure_class, type(error).__name__, str(error)[:4000]),
            event=(
                "retrying",
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
        module, args = _exception_origin(exc, error_class)
        return self._finish(
            claim,
            "dead",
            "state = 'dead', finished_at = now(), failure_class = %s, error_class = %s, "
            "last_error = %s, traceback = %s, error_module = %s, error_args = %s",
            (failure_class, error_class, error[:4000], traceback[-16000:], module, args),
            event=("dead", {"failure_class": failure_class, "error_class": error_class}),
        )

    def cancelled_while_running(self, claim: Claim) -> bool:
        return self._finish(
            claim,
            "cancelled",
            "state = 'cancelled', finished_at = now()",
            (),
            event=("cancelled", {"while_running": True}),
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
        assignments = (
            "state = 'scheduled', run_at = now() + make_interval(secs => %s), attempt = attempt - 1"
        )
        event = ("scheduled", {"reason": "deferred", "why": reason, "delay": delay})
        if max_seconds is None:
            done = self._finish(claim, "deferred", assignments, (delay,), event=event)
            return "deferred" if done else "lost"
        query = (
            "SELECT first_deferred_at IS NOT NULL AND first_deferred_at <= now() - "  # noqa: S608
            f"make_interval(secs => %s) FROM synth_jobs WHERE {self._FENCE} FOR UPDATE"
        )
        with self.connection() as conn, conn.transaction():
            row = conn.execute(
                query.encode(), (max_seconds, claim.job_id, claim.attempt, claim.owner)
            ).fetchone()
            if row is not None and row[0]:
                return "exhausted"
            done = row is not None and self._finish(
                claim,
                "deferred",
                assignments + ", first_deferred_at = coalesce(first_deferred_at, now())",
                (delay,),
                conn=conn,
            )
        if row is None:
            self.record_late(claim, "deferred")
        if not done:
            return "lost"
        self.announce_finish(claim, event[0], **event[1])
        return "deferred"

    # --- end of deferral -------------------------------------------------------------------

    def _finish(
        self,
        claim: Claim,
        outcome: str,
        assignments: str,
        params: Sequence[Any],
        conn: psycopg.Connection[Any] | None = None,
        event: tuple[str, dict[str, Any]] | None = None,
    ) -> bool:
        """One fenced state change; ``event`` is announced once it commits (by the caller
        when ``conn`` is the caller's transaction: see :meth:`announce_finish`)."""
        query = (
            f"UPDATE synth_jobs SET {assignments}, lease_owner = NULL, "  # noqa: S608
            f"lease_expires_at = NULL, updated_at = now() WHERE {self._FENCE}"
        )
        args = (*params, claim.job_id, claim.attempt, claim.owner)
        if conn is not None:
            done = conn.execute(query.encode(), args).rowcount == 1
        else:
            with self.connection() as own:
                done = own.execute(query.encode(), args).rowcount == 1
        if not done:
            self.record_late(claim, outcome)
        elif event is not None and conn is None:
            self.announce_finish(claim, event[0], **event[1])
        return done

    def record_late(self, claim: Claim, outcome: str) -> None:
        if self.lifecycle.listening:
            self.lifecycle.announce(
                "late_refused", claim.job_id, **self.about(claim), data={"outcome": outcome}
            )
        with self.connection() as conn:
            conn.execute(
                "INSERT INTO synth_late_completions (job_id, attempt, owner, outcome) "
                "VALUES (%s, %s, %s, %s)",
                (claim.job_id, claim.attempt, claim.owner, outcome),
            )

    def worker_lost(self, job_id: str, owner_prefix: str) -> str | None:
        """The process running ``job_id`` died: requeue it, or dead-letter it as a poison
        pill once it has killed ``SYNTH_POISON_PILL_LOSSES`` workers; a job cancelled while it
        ran ends ``cancelled`` instead (never counted as a loss). Returns the new state."""
        if self.cancel_lost(job_id, owner_prefix):
            return "cancelled"
        with self.connection() as conn:
            row = conn.execute(
                "UPDATE synth_jobs SET worker_losses = worker_losses + 1, "
                "state = CASE WHEN worker_losses + 1 >= %s THEN 'dead' ELSE 'queued' END, "
                "failure_class = CASE WHEN worker_losses + 1 >= %s THEN 'poison_pill' "
                "ELSE 'worker_lost' END, "
                "error_class = 'WorkerLostError', last_error = 'the worker process died', "
                "finished_at = CASE WHEN worker_losses + 1 >= %s THEN now() END, "
                "published_at = now(), lease_owner = NULL, lease_expires_at = NULL, "
                "updated_at = now() WHERE id = %s AND state = 'running' AND NOT cancel_requested "
                "AND starts_with(lease_owner, %s) RETURNING state, task, queue, attempt",
                (*(self.settings.poison_pill_losses,) * 3, job_id, owner_prefix),
            ).fetchone()
        if row is None:
            return None
        if row[0] == "dead":
            self._announce_row("dead", job_id, row, failure_class="poison_pill")
        else:
            self._announce_row("queued", job_id, row, reason="worker_lost")
        return str(row[0])

    def _announce_row(self, kind: str, job_id: str, row: Sequence[Any], **data: Any) -> None:
        """Announce from a ``RETURNING state, task, queue, attempt`` row."""
        if self.lifecycle.listening:
            self.lifecycle.announce(
                kind, job_id, task=row[1], queue=row[2], attempt=row[3], data=data
            )

    def hard_timeout(self, job_id: str, error: str, owner_prefix: str) -> str | None:
        """The job hit its hard time limit (its process was killed): retry or dead-letter;
        a job cancelled while it ran ends ``cancelled``."""
        if self.cancel_lost(job_id, owner_prefix):
            return "cancelled"
        with self.connection() as conn:
            row = conn.execute(
                "UPDATE synth_jobs SET "
                "state = CASE WHEN attempt >= COALESCE(max_attempts, %s) THEN 'dead' "
                "ELSE 'failed-retrying' END, run_at = now(), failure_class = 'hard_timeout', "
                "error_class = 'TimeLimitExceeded', last_error = %s, "
                "finished_at = CASE WHEN attempt >= COALESCE(max_attempts, %s) THEN now() END, "
                "lease_owner = NULL, lease_expires_at = NULL, updated_at = now() "
                "WHERE id = %s AND state = 'running' AND NOT cancel_requested "
                "AND starts_with(lease_owner, %s) RETURNING state, task, queue, attempt",
                (
                    self.settings.max_attempts,
                    error,
                    self.settings.max_attempts,
                    job_id,
                    owner_prefix,
                ),
            ).fetchone()
        if row is None:
            return None
        self._announce_row(
            "dead" if row[0] == "dead" else "retrying",
            job_id,
            row,
            failure_class="hard_timeout",
            error_class="TimeLimitExceeded",
        )
        return str(row[0])

    def record_rejected(
        self, job_id: str | None, task: str, queue: str, raw: str, reason: str, error: str
    ) -> str:
        """A message a worker refused (``synth_workers.screening``): dead-letter it with
        failure class ``rejected_message`` and ``reason`` as its error class; an existing
        live row of that id ends so. ``raw``: the message's first bytes, as text."""
        from synth_workers.ledger.refusals import Refusal

        return self.record_rejected_many([Refusal(job_id, task, queue, raw, reason, error)])[0]

    _REJECT = (
        "INSERT INTO synth_jobs (id, task, queue, priority, payload, state, failure_class, "
        "error_class, last_error, finished_at) SELECT v.id, v.task, v.queue, 0, v.payload, "
        "'dead', 'rejected_message', v.reason, v.error, now() FROM unnest(%s::uuid[], "
        "%s::text[], %s::text[], %s::jsonb[], %s::text[], %s::text[]) AS v(id, task, queue, "
        "payload, reason, error) ON CONFLICT (id) DO UPDATE SET state = 'dead', failure_class "
        "= 'rejected_message', error_class = EXCLUDED.error_class, last_error = "
        "EXCLUDED.last_error, finished_at = now(), lease_owner = NULL, lease_expires_at = NULL,"
        " updated_at = now() WHERE synth_jobs.state NOT IN ('succeeded', 'dead', 'cancelled',"
        " 'running') RETURNING id"
    )

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
                self._REJECT,
                (
                    list(rows),
                    [_text(r.task, 500) for r in rows.values()],
                    [_text(r.queue, 500) for r in rows.values()],
                    [Jsonb({"raw": _text(r.raw, RESULT_LIMIT_BYTES)}) for r in rows.values()],
                    [_text(r.reason, 100) for r in rows.values()],
                    [_text(r.detail, 4000) for r in rows.values()],
                ),
            ).fetchall()
        if self.lifecycle.listening:
            for (row_id,) in written:
                r = rows[str(row_id)]
                self.lifecycle.announce(
                    "dead",
                    str(row_id),
                    task=_text(r.task, 500),
                    queue=_text(r.queue, 500),
                    data={
                        "failure_class": "rejected_message",
                        "error_class": r.reason,
                        "reason": r.reason,
                    },
                )
        return ids

    def expire(self, job_id: str, task: str, queue: str, raw: str, error: str) -> str:
        """A message whose ``expires`` passed before it started: its live job ends
        ``cancelled`` (Celery's *revoked*); one without a ledger row is dead-lettered
        (reason ``expired``). Returns the state it ended in, or ``"final"`` when the job
        had already started or finished (nothing changes)."""
        with self.connection() as conn:
            row = conn.execute(
                "UPDATE synth_jobs SET state = 'cancelled', last_error = %s, finished_at = "
                "now(), updated_at = now() WHERE id = %s AND state IN ('queued', 'scheduled', "
                "'failed-retrying') RETURNING state, task, queue, attempt",
                (_text(error, 4000), job_id),
            ).fetchone()
            exists = row is not None or (
                conn.execute("SELECT 1 FROM synth_jobs WHERE id = %s", (job_id,)).fetchone()
                is not None
            )
        if row is not None:
            self._announce_row("cancelled", job_id, row, reason="expired")
            return "cancelled"
        if exists:
            return "final"
        self.record_rejected(job_id, task, queue, raw, "expired", error)
        return "dead"

    # --- cancellation honoured: revoke, purge, expires -----------------------------------
    def cancel_if_requested(self, claim: Claim, delay: float = 0.0) -> bool:
        """End the claimed job ``cancelled`` (fenced) if it was cancelled while it ran, or if
        it expires within ``delay`` seconds (``last_error`` = ``expired``): a retry or a
        deferral must not run it again. Returns whether it ended so."""
        with self.connection() as conn:
            row = conn.execute(
                "UPDATE synth_jobs SET state = 'cancelled', finished_at = now(), last_error = "
                "CASE WHEN cancel_requested THEN last_error ELSE 'expired' END, lease_owner = "
                "NULL, lease_expires_at = NULL, updated_at = now() WHERE id = %s AND attempt = "
                "%s AND lease_owner = %s AND state = 'running' AND (cancel_requested OR "
                "expires_at <= now() + make_interval(secs => %s)) "
                "RETURNING cancel_requested, task, queue, attempt",
                (claim.job_id, claim.attempt, claim.owner, max(0.0, delay)),
            ).fetchone()
        if row is None:
            return False
        self.announce_finish(
            claim, "cancelled", while_running=True, reason="cancelled" if row[0] else "expired"
        )
        return True

    def cancel_lost(self, job_id: str, owner_prefix: str) -> bool:
        """The process running ``job_id`` died or was killed (``revoke(terminate=True)``, a
        hard time limit) after the job was cancelled: it ends ``cancelled``, not requeued."""
        with self.connection() as conn:
            row = conn.execute(
                "UPDATE synth_jobs SET state = 'cancelled', finished_at = now(), lease_owner = "
                "NULL, lease_expires_at = NULL, updated_at = now() WHERE id = %s AND state = "
                "'running' AND cancel_requested AND starts_with(lease_owner, %s) "
                "RETURNING state, task, queue, attempt",
                (job_id, owner_prefix),
            ).fetchone()
        if row is None:
            return False
        self._announce_row("cancelled", job_id, row, reason="cancelled", while_running=True)
        return True

    _END_CANCELLED = (
        "WITH e AS (UPDATE synth_jobs SET state = 'cancelled', last_error = 'expired', "
        "finished_at = now(), updated_at = now() WHERE id IN (SELECT id FROM synth_jobs WHERE "
        "expires_at <= now() AND state IN ('scheduled', 'queued', 'failed-retrying') LIMIT %s "
        "FOR UPDATE SKIP LOCKED) RETURNING id, task, queue, attempt), "
        "c AS (UPDATE synth_jobs SET state = 'cancelled', finished_at = now(), lease_owner = "
        "NULL, lease_expires_at = NULL, updated_at = now() WHERE id IN (SELECT id FROM "
        "synth_jobs WHERE state = 'running' AND lease_expires_at < now() AND cancel_requested "
        "LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING id, task, queue, attempt) "
        "SELECT 'expired', * FROM e UNION ALL SELECT 'cancelled', * FROM c"
    )

    def end_cancelled(self, limit: int = 1000) -> int:
        """The sweeper's pass over cancellations: jobs not started whose ``expires_at``
        passed end ``cancelled`` (``last_error`` = ``expired``), and cancelled jobs whose
        worker stopped renewing their lease end ``cancelled`` instead of being reaped and run
        again. One statement; returns how many jobs ended."""
        with self.connection() as conn:
            rows = conn.execute(self._END_CANCELLED, (limit, limit)).fetchall()
        for reason, job_id, task, queue, attempt in rows:
            self._announce_row(
                "cancelled", str(job_id), (None, task, queue, attempt), reason=reason
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
            rows = conn.execute(
                "UPDATE synth_jobs SET state = 'cancelled', last_error = %s, finished_at = "
                "now(), updated_at = now() WHERE id = ANY(%s::uuid[]) AND state = 'queued' "
                "RETURNING id, task, queue, attempt",
                (reason, ids),
            ).fetchall()
        for job_id, task, queue, attempt in rows:
            self._announce_row(
                "cancelled", str(job_id), (None, task, queue, attempt), reason=reason
            )
        return len(rows)

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

    # --- sweeper -------------------------------------------------------------------------
    def promote_due(self, limit: int = 1000) -> list[Publishable]:
        """Scheduled jobs and retries whose time has come → queued (to publish)."""
        return self._to_publish(
            "WITH due AS (SELECT id FROM synth_jobs WHERE state IN ('scheduled', "
            "'failed-retrying') AND run_at <= now() AND (expires_at IS NULL OR expires_at > "
            "now()) AND NOT cancel_requested ORDER BY run_at LIMIT %s FOR UPDATE SKIP LOCKED) "
            "UPDATE synth_jobs j SET state = 'queued', "
            "published_at = now(), updated_at = now() FROM due WHERE j.id = due.id "
            "RETURNING j.id, j.task, j.queue, j.priority, j.payload, j.args, j.message, "
            "j.retries",
            (limit,),
            "due",
        )

    def take_outbox(self, limit: int = 1000) -> list[Publishable]:
        """Committed transactional enqueues not yet published."""
        return self._to_publish(
            "WITH o AS (SELECT id FROM synth_jobs WHERE state = 'queued' AND published_at IS "
            "NULL LIMIT %s FOR UPDATE SKIP LOCKED) UPDATE synth_jobs j SET published_at = now()"
            " FROM o WHERE j.id = o.id "
            "RETURNING j.id, j.task, j.queue, j.priority, j.payload, j.args, j.message, "
            "j.retries",
            (limit,),
            "outbox",
        )

    def reap_expired(self, limit: int = 1000) -> tuple[list[Publishable], int]:
        """Running jobs whose lease expired → queued again (or dead as poison pills)."""
        with self.connection() as conn:
            rows = conn.execute(
                "WITH x AS (SELECT id FROM synth_jobs WHERE state = 'running' AND "
                "lease_expires_at < now() AND NOT cancel_requested LIMIT %s "
                "FOR UPDATE SKIP LOCKED) "
                "UPDATE synth_jobs j SET worker_losses = worker_losses + 1, "
                "state = CASE WHEN worker_losses + 1 >= %s THEN 'dead' ELSE 'queued' END, "
                "failure_class = CASE WHEN worker_losses + 1 >= %s THEN 'poison_pill' "
                "ELSE 'worker_lost' END, error_class = 'LeaseExpired', "
                "last_error = 'lease expired: worker ' || coalesce(lease_owner, '?') || "
                "' stopped renewing', finished_at = CASE WHEN worker_losses + 1 >= %s "
                "THEN now() END, published_at = now(), lease_owner = NULL, "
                "lease_expires_at = NULL, updated_at = now() FROM x WHERE j.id = x.id "
                "RETURNING j.id, j.task, j.queue, j.priority, j.payload, j.args, j.message, "
                "j.retries, j.state",
                (limit,) + (self.settings.poison_pill_losses,) * 3,
            ).fetchall()
        requeued = [Publishable.from_row(r) for r in rows if r[8] == "queued"]
        if self.lifecycle.listening:
            for r in rows:
                if r[8] == "queued":
                    self.lifecycle.announce(
                        "queued",
                        str(r[0]),
                        task=r[1],
                        queue=r[2],
                        data={"reason": "lease_expired"},
                    )
                else:
                    self.lifecycle.announce(
                        "dead",
                        str(r[0]),
                        task=r[1],
                        queue=r[2],
                        data={"failure_class": "poison_pill", "error_class": "LeaseExpired"},
                    )
        return requeued, len(rows) - len(requeued)

    def stale_queued(self, grace: float, limit: int = 5000) -> list[Publishable]:
        """Queued jobs published more than ``grace`` seconds ago (to check against Redis)."""
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT id, task, queue, priority, payload, args, message, retries FROM synth_jobs "
                "WHERE state = "
                "'queued' AND published_at < now() - make_interval(secs => %s) "
                "AND NOT cancel_requested AND (expires_at IS NULL OR expires_at > now()) "
                "ORDER BY published_at LIMIT %s",
                (grace, limit),
            ).fetchall()
        return [Publishable.from_row(r) for r in rows]

    def mark_republished(self, ids: Sequence[str]) -> None:
        with self.connection() as conn:
            conn.execute(
                "UPDATE synth_jobs SET published_at = now() WHERE id = ANY(%s) "
                "AND state = 'queued'",
                (list(ids),),
            )

    def _to_publish(
        self, query: str, params: Sequence[Any], reason: str | None = None
    ) -> list[Publishable]:
        with self.connection() as conn:
            rows = conn.execute(query.encode(), params).fetchall()
        jobs = [Publishable.from_row(r) for r in rows]
        if reason is not None and self.lifecycle.listening:
            for job in jobs:
                self.lifecycle.announce(
                    "queued", job.id, task=job.task, queue=job.queue, data={"reason": reason}
                )
        return jobs

    # --- producer side: reads and cancellation -------------------------------------------
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
                "UPDATE synth_jobs SET state = CASE WHEN state = 'running' THEN state "
                "ELSE 'cancelled' END, cancel_requested = true, finished_at = CASE WHEN "
                "state = 'running' THEN finished_at ELSE now() END, updated_at = now() "
                "WHERE id = %s AND state IN ('scheduled', 'queued', 'failed-retrying', "
                "'running') RETURNING state, task, queue, attempt",
                (job_id,),
            ).fetchone()
            exists = (
                row is not None
                or conn.execute("SELECT 1 FROM synth_jobs WHERE id = %s", (job_id,)).fetchone()
                is not None
            )
        if row is None:
            return "final" if exists else "unknown"
        if row[0] == "running":
            return "requested"
        self._announce_row("cancelled", job_id, row)  # once committed
        return "cancelled"

    def list_jobs(
        self,
        *,
        states: Sequence[str] = (),
        task: str | None = None,
        queue: str | None = None,
        failure_class: str | None = None,
        older_than: float | None = None,
        newer_than: float | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        where, params = self.filters(
            states=states,
            task=task,
            queue=queue,
            failure_class=failure_class,
            older_than=older_than,
            newer_than=newer_than,
        )
        return self.list_where(where, params, limit)

    def list_where(self, where: str, params: Sequence[Any], limit: int) -> list[dict[str, Any]]:
        """Jobs matching a clause made by :meth:`filters`, newest first."""
        with self.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(
                f"SELECT * FROM synth_jobs WHERE {where} "  # noqa: S608 - fixed fragments
                "ORDER BY enqueued_at DESC LIMIT %s",
                (*params, limit),
            ).fetchall()

    @staticmethod
    def filters(
        *,
        states: Sequence[str] = (),
        task: str | None = None,
        queue: str | None = None,
        failure_class: str | None = None,
        older_than: float | None = None,
        newer_than: float | None = None,
    ) -> tuple[str, list[Any]]:
        """A WHERE clause (fixed fragments, bound values) for job listings."""
        parts = ["true"]
        params: list[Any] = []
        if states:
            parts.append("state = ANY(%s)")
            params.append(list(states))
        if task:
            parts.append("task = %s")
            params.append(task)
        if queue:
            parts.append("queue = %s")
            params.append(queue)
        if failure_class:
            parts.append("failure_class = %s")
            params.append(failure_class)
        if older_than is not None:
            parts.append("coalesce(finished_at, enqueued_at) < now() - make_interval(secs => %s)")
            params.append(older_than)
        if newer_than is not None:
            parts.append("coalesce(finished_at, enqueued_at) >= now() - make_interval(secs => %s)")
            params.append(newer_than)
        return " AND ".join(parts), params

    def now(self) -> datetime:
        with self.connection() as conn:
            row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        return row[0]  # type: ignore[no-any-return]
