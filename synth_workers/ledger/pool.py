"""Connections to the ledger: a per-process pool, dedicated connections, commit durability.

The pool opens lazily in the process that uses it, so prefork children never share a
parent's sockets. Every connection sets ``search_path`` to ``SYNTH_DB_SCHEMA``, which is how
the ledger's unqualified table names honour the schema. A connection failure (and only
that: see :func:`is_connection_failure`) is raised as :class:`ServiceUnavailableError`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool
from psycopg_pool.errors import PoolClosed, PoolTimeout, TooManyRequests

from synth_workers.errors import ConfigurationError, ServiceUnavailableError
from synth_workers.lifecycle import Lifecycle
from synth_workers.settings import Settings, mask_url


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


def _sentence(exc: BaseException) -> str:
    """``exc``'s message on one line, ending as a sentence."""
    text = " ".join(str(exc).split())
    return text if text.endswith((".", "?", "!")) else f"{text}."


_PoolKey = tuple[int, str, str, int, int, int]
#: The pools of this process, shared by every ledger of the same database, schema, commit
#: mode, sizes and idle timeout (any number of apps installed in one process, e.g. a test app
#: per test, open one pool between them, not one each), with how many ledgers hold each.
_shared: dict[_PoolKey, tuple[ConnectionPool[psycopg.Connection[Any]], int]] = {}
_shared_lock = threading.Lock()


def _fresh_lock_in_child() -> None:
    # Another thread may have held the lock when the process forked (a prefork child):
    # the child starts with a free one. The parent's pools stay referenced, never closed
    # from the child (their sockets belong to the parent); the child's keys differ (pid).
    global _shared_lock
    _shared_lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock_in_child)


def _acquire(key: _PoolKey, build: Callable[[], ConnectionPool[psycopg.Connection[Any]]]) -> (
    ConnectionPool[psycopg.Connection[Any]]
):  # fmt: skip
    with _shared_lock:
        found = _shared.get(key)
        pool = build() if found is None else found[0]
        _shared[key] = (pool, 1 if found is None else found[1] + 1)
        return pool


def _release(key: _PoolKey) -> None:
    """One ledger lets go of the pool; the last one closes it."""
    with _shared_lock:
        found = _shared.get(key)
        if found is None:
            return
        pool, holders = found
        if holders > 1:
            _shared[key] = (pool, holders - 1)
            return
        del _shared[key]
    pool.close()


def shared_pool(
    settings: Settings,
    conninfo: str,
    kwargs: dict[str, Any],
    unavailable: Callable[[BaseException], ServiceUnavailableError],
) -> tuple[ConnectionPool[psycopg.Connection[Any]], _PoolKey]:
    """This process's pool for ``conninfo`` with ``kwargs`` (opened on first use, shared by
    every holder of the same key: see :data:`_shared`), and its key for :func:`_release`.
    An unreachable server fails once, within ``SYNTH_DB_CONNECT_TIMEOUT``, as
    ``unavailable(exc)``."""
    pid = os.getpid()
    size = settings.db_pool_size
    key: _PoolKey = (
        pid,
        conninfo,
        " ".join(f"{k}={v}" for k, v in sorted(kwargs.items())),
        size,
        settings.db_pool_min,
        settings.db_idle_timeout,
    )

    def build() -> ConnectionPool[psycopg.Connection[Any]]:
        # One connection first: an unreachable Postgres fails here, once, within
        # SYNTH_DB_CONNECT_TIMEOUT, instead of the pool's retries.
        try:
            psycopg.connect(conninfo, **kwargs).close()
        except psycopg.OperationalError as exc:
            if not is_connection_failure(exc):
                raise
            raise unavailable(exc) from None
        pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            conninfo,
            min_size=min(settings.db_pool_min, size),
            max_size=size,
            max_idle=settings.db_idle_timeout / 1000,  # DB_IDLE_TIMEOUT: ms
            # After an outage (a cut link) the pool's background reconnection backs off
            # exponentially; giving it up after this, the next use reconnects at once, so a
            # worker recovers within seconds.
            reconnect_timeout=2 * settings.db_tcp_timeout,
            kwargs=kwargs,
            open=False,
            name=f"synth-ledger-{pid}",
        )
        try:
            pool.open(wait=True, timeout=2 * settings.db_connect_timeout)
        except Exception as exc:
            raise unavailable(exc) from exc
        return pool

    return _acquire(key, build), key


def release_pool(key: _PoolKey | None, pid: int) -> None:
    """Let go of the pool of ``key`` taken in process ``pid`` (nothing in another process:
    a forked child never closes its parent's pool)."""
    if key is not None and pid == os.getpid():
        _release(key)


class LedgerPool:
    """The ledger's connections; every part of :class:`~synth_workers.ledger.store.Ledger`
    builds on it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        #: Told of every state change this process commits (see ``synth_workers.lifecycle``).
        self.lifecycle = Lifecycle()
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._key: _PoolKey | None = None
        self._pid = 0
        self._lock = threading.Lock()
        # A forked child (prefork pool) must not touch the parent's pool or a lock another
        # thread held at fork time: it starts afresh. The parent's pool object is kept
        # referenced, never closed from the child (its sockets belong to the parent).
        self._inherited: list[object] = []
        #: Connections kept by threads between uses (:meth:`held`), by (pid, thread).
        self._held: dict[tuple[int, int], psycopg.Connection[Any]] = {}
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._inherited.append(self._held)
        self._held = {}
        if self._pool is not None:
            self._inherited.append(self._pool)
        self._pool = None
        self._key = None
        self._pid = 0

    @property
    def conninfo(self) -> str:
        url = self.settings.database_url
        if not url:
            raise ConfigurationError(
                "DATABASE_URL is not set and no `synth-workers dev` stack is running: the job "
                "ledger needs Postgres. Set DATABASE_URL (postgresql://user:password@host:5432/db),"
                " or start `synth-workers dev` in another shell."
            )
        return url

    #: False in worker processes: state transitions commit without waiting for the WAL
    #: flush (a Postgres crash can only make a job run again: at least once), while
    #: enqueues, effect transactions and cancellations still commit durably.
    durable_commits = True

    def use_fast_commits(self) -> None:
        """Worker processes: asynchronous commits for claims, renewals and completions."""
        self.durable_commits = False
        self.close()  # the next connection comes from a pool of fast-commit connections

    def connect_kwargs(self, durable: bool = True) -> dict[str, Any]:
        options = f"-c search_path={self.settings.db_schema}"
        if not durable:
            options += " -c synchronous_commit=off"
        return {
            "options": options,
            "connect_timeout": self.settings.db_connect_timeout,
            **self.tcp_kwargs(),
        }

    def tcp_kwargs(self) -> dict[str, Any]:
        """libpq's TCP settings: a connection behind a dead link (packets dropped, nothing
        refused) fails within ``SYNTH_DB_TCP_TIMEOUT`` instead of TCP's minutes of
        retransmissions, so a cut-off worker's renewals fail and it self-fences in time
        (``synth_workers.selffence``). Ignored on a Unix socket."""
        tcp = self.settings.db_tcp_timeout
        return {
            "keepalives": 1,
            "keepalives_idle": max(1, int(tcp / 2)),
            "keepalives_interval": max(1, int(tcp / 6)),
            "keepalives_count": 3,
            "tcp_user_timeout": int(tcp * 1000),
        }

    def durable(self, conn: psycopg.Connection[Any]) -> None:
        """Make the open transaction on ``conn`` commit durably (worker processes)."""
        if not self.durable_commits:
            conn.execute("SET LOCAL synchronous_commit = on")

    @property
    def pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        """This process's pool for the ledger's database (shared with every other ledger of
        the same database, schema, commit mode and size: see :data:`_shared`)."""
        pid = os.getpid()
        if self._pool is None or self._pid != pid:
            with self._lock:
                if self._pool is None or self._pid != pid:
                    kwargs = {**self.connect_kwargs(self.durable_commits), "autocommit": True}
                    self._pool, self._key = shared_pool(
                        self.settings, self.conninfo, kwargs, self._unavailable
                    )
                    self._pid = pid
        return self._pool

    def _unavailable(self, exc: BaseException) -> ServiceUnavailableError:
        return ServiceUnavailableError(
            f"Postgres is not reachable at {mask_url(self.settings.database_url)} "
            f"(DATABASE_URL): {_sentence(exc)} Start it, or run `synth-workers dev` for the "
            "embedded stack."
        )

    @contextmanager
    def _failures(self) -> Iterator[None]:
        """A connection failure (only that: see :func:`is_connection_failure`) raised inside
        is raised as :class:`ServiceUnavailableError`."""
        try:
            yield
        except psycopg.OperationalError as exc:
            if not is_connection_failure(exc):
                raise
            raise self._unavailable(exc) from exc

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection; a connection failure (only that: see
        :func:`is_connection_failure`) is raised as :class:`ServiceUnavailableError`."""
        # Worker processes wait at most SYNTH_DB_TCP_TIMEOUT for a connection: a job cut off
        # from Postgres gets its error (and self-fences) instead of waiting the pool's 30 s.
        wait = None if self.durable_commits else self.settings.db_tcp_timeout
        # psycopg_pool's own ``connection()`` adds a ``with conn:`` (a commit or a rollback
        # call: nothing on these autocommit connections, whose transactions are the callers'
        # own blocks; ``putconn`` rolls back one left open) and two more context managers:
        # about 10 µs per use here, once per enqueue and per job.
        pool = self.pool
        try:
            conn = pool.getconn(timeout=wait)
        except psycopg.OperationalError as exc:
            if not is_connection_failure(exc):
                raise
            raise self._unavailable(exc) from exc
        try:
            yield conn
        except psycopg.OperationalError as exc:
            if not is_connection_failure(exc):
                raise
            raise self._unavailable(exc) from exc
        finally:
            pool.putconn(conn)

    @contextmanager
    def held(self) -> Iterator[psycopg.Connection[Any]]:
        """The calling thread's own pooled connection, kept between uses: for a statement run
        once per job (the claim), whose pool check-out and return cost more Python than the
        statement. Given back when it breaks or is left in a transaction, and at close.
        Only a worker process's main thread keeps one (a prefork or solo pool's job thread):
        job threads of a threads pool outnumber the pool's connections, and any other process
        (a test, a script) would keep one checked out for as long as it lives."""
        if self.durable_commits or threading.current_thread() is not threading.main_thread():
            with self.connection() as pooled:
                yield pooled
            return
        key = (os.getpid(), threading.get_ident())
        pool = self.pool
        with self._failures():
            conn = self._held.pop(key, None) or pool.getconn(timeout=self.settings.db_tcp_timeout)
            try:
                yield conn
            except BaseException:
                pool.putconn(conn)  # a broken one is discarded there
                raise
        if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            pool.putconn(conn)
        else:
            self._held[key] = conn

    def connect(self) -> psycopg.Connection[Any]:
        """A dedicated connection (LISTEN, long transactions), not from the pool."""
        with self._failures():
            return psycopg.connect(self.conninfo, autocommit=True, **self.connect_kwargs())

    def close(self) -> None:
        """Let go of the pool (closed when no other ledger of this process holds it)."""
        if self._pool is not None and self._pid == os.getpid():
            for key in [k for k in self._held if k[0] == self._pid]:
                self._pool.putconn(self._held.pop(key))
        if self._pool is not None:
            release_pool(self._key, self._pid)
        self._pool = None
        self._key = None

    def now(self) -> datetime:
        with self.connection() as conn:
            row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        return row[0]  # type: ignore[no-any-return]
