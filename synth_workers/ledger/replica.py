"""The read pool: connections for the ledger's reads that tolerate replication lag.

``DATABASE_READ_URL`` names a Postgres read replica (streaming, hot standby). The reads that
may be a little behind go there: job and DLQ listings and their counts, the DLQ digest, and
the cluster snapshot's counts (``synth-workers status``, the cluster metrics collector).
Everything else stays on ``DATABASE_URL``: claims, lease renewals, every fenced finish,
enqueue and its idempotency look-ups, replay and purge, and every read that follows a write
(``JobHandle.wait``/``state``, ``AsyncResult``, ``jobs show``, the sweeper's passes). The
table of which path uses which is in ``docs/deployment.md``.

With ``DATABASE_READ_URL`` unset the read pool is the primary's own pool. Set, it is a pool
of its own (opened on first use in each process, like the primary's) whose sessions are
read-only (``default_transaction_read_only``) and named ``synth-ledger-read`` in
``pg_stat_activity`` unless the URL names an ``application_name``. A replica that cannot be
reached is reported as :class:`~synth_workers.errors.ServiceUnavailableError` naming
``DATABASE_READ_URL``: a listing does not silently move its load to the primary.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg_pool import ConnectionPool

from synth_workers.errors import ServiceUnavailableError
from synth_workers.ledger.pool import is_connection_failure, release_pool, shared_pool
from synth_workers.settings import mask_url

if TYPE_CHECKING:
    from synth_workers.ledger.pool import LedgerPool

#: ``application_name`` of the read pool's sessions (when the URL sets none).
READ_APPLICATION_NAME = "synth-ledger-read"


class ReadPool:
    """This process's connections to ``DATABASE_READ_URL``, or the primary's when unset."""

    def __init__(self, primary: LedgerPool) -> None:
        self.primary = primary
        self._pool: ConnectionPool[psycopg.Connection[Any]] | None = None
        self._key: Any = None
        self._pid = 0
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        # The parent's pool stays the parent's (never closed from here); the child opens its own.
        self._lock = threading.Lock()
        self._pool = None
        self._key = None
        self._pid = 0

    @property
    def url(self) -> str | None:
        """``DATABASE_READ_URL``; ``None`` when reads go to the primary."""
        return self.primary.settings.database_read_url or None

    def connect_kwargs(self) -> dict[str, Any]:
        s = self.primary.settings
        return {
            "options": f"-c search_path={s.db_schema} -c default_transaction_read_only=on",
            "connect_timeout": s.db_connect_timeout,
            "fallback_application_name": READ_APPLICATION_NAME,
            "autocommit": True,
        }

    def _unavailable(self, exc: BaseException) -> ServiceUnavailableError:
        text = " ".join(str(exc).split()).rstrip(".")
        return ServiceUnavailableError(
            f"the Postgres read replica is not reachable at {mask_url(self.url)} "
            f"(DATABASE_READ_URL): {text}. Start it, or unset DATABASE_READ_URL to read from "
            "DATABASE_URL."
        )

    @property
    def pool(self) -> ConnectionPool[psycopg.Connection[Any]]:
        """This process's pool for the replica (``DATABASE_READ_URL`` must be set)."""
        url = self.url
        assert url is not None
        pid = os.getpid()
        if self._pool is None or self._pid != pid:
            with self._lock:
                if self._pool is None or self._pid != pid:
                    self._pool, self._key = shared_pool(
                        self.primary.settings, url, self.connect_kwargs(), self._unavailable
                    )
                    self._pid = pid
        return self._pool

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection for a lag-tolerant read: the replica's, or the primary's when
        ``DATABASE_READ_URL`` is unset."""
        if self.url is None:
            with self.primary.connection() as conn:
                yield conn
            return
        try:
            with self.pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as exc:
            if not is_connection_failure(exc):
                raise
            raise self._unavailable(exc) from exc

    def close(self) -> None:
        """Let go of the replica's pool (closed when no other ledger of this process holds it)."""
        if self._pool is not None:
            release_pool(self._key, self._pid)
        self._pool = None
        self._key = None
