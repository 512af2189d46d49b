"""Reads and bulk writes over many jobs: listings and their filters (CLI, DLQ), the DLQ's
replay, purge, retention and digest, the cluster snapshot's counts, and periodic slots.

A filter is a :class:`psycopg.sql.Composable` (fixed fragments) with its bound values.

Reads that tolerate lag (:meth:`Queries.list_where` and so ``list_jobs``, :meth:`Queries.
count_where`, :meth:`Queries.dead_summary`, :meth:`Queries.counts`) take their connection
from :attr:`Queries.reads`: the read replica of ``DATABASE_READ_URL``, or the primary when it
is unset (``synth_workers.ledger.replica``). Writes, and the reads inside a write's
transaction (:meth:`Queries.lock_replayable`, periodic slots), use the primary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from synth_workers.ledger.replica import ReadPool
from synth_workers.ledger.rows import UNFINISHED, LedgerRows
from synth_workers.settings import Settings
from synth_workers.states import FailureClass, JobState

#: States of a job waiting for its time.
_DELAYED = (JobState.SCHEDULED, JobState.RETRYING)
#: Every state, in the order listings show them.
_ALL = (*UNFINISHED, JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED)


@dataclass(frozen=True)
class QueueCounts:
    """The ledger's view of one queue."""

    #: Jobs waiting for their time (scheduled or retrying).
    delayed: int
    #: Seconds the oldest queued job has waited since due; ``None`` with none queued.
    oldest_age_seconds: float | None


@dataclass(frozen=True)
class LedgerCounts:
    """The ledger's part of the cluster snapshot (``synth_workers.cluster``)."""

    queues: dict[str, QueueCounts]
    #: Jobs per unfinished state (every one present).
    unfinished: dict[str, int]
    dlq_size: int
    #: Unix time of the newest periodic slot taken, ``None`` when none was.
    beat_last_slot: float | None
    #: Jobs per state (every one present) enqueued in the last hour, when asked for.
    last_hour: dict[str, int] = field(default_factory=dict)


class Queries(LedgerRows):
    """Listings, DLQ operations and counts."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        #: Connections for the lag-tolerant reads (the replica, or the primary when unset).
        self.reads = ReadPool(self)

    def close(self) -> None:
        super().close()
        self.reads.close()

    def list_jobs(
        self,
        *,
        states: Sequence[str] = (),
        task: str | None = None,
        queue: str | None = None,
        failure_class: str | None = None,
        older_than: float | None = None,
        newer_than: float | None = None,
        correlation_id: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        where, params = self.filters(
            states=states,
            task=task,
            queue=queue,
            failure_class=failure_class,
            older_than=older_than,
            newer_than=newer_than,
            correlation_id=correlation_id,
        )
        return self.list_where(where, params, limit)

    def list_where(
        self, where: sql.Composable, params: Sequence[Any], limit: int
    ) -> list[dict[str, Any]]:
        """Jobs matching a clause made by :meth:`filters`, newest first."""
        query = sql.SQL(
            "SELECT * FROM synth_jobs WHERE {where} ORDER BY enqueued_at DESC LIMIT %s"
        ).format(where=where)
        with self.reads.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(query, (*params, limit)).fetchall()

    @staticmethod
    def filters(
        *,
        states: Sequence[str] = (),
        task: str | None = None,
        queue: str | None = None,
        failure_class: str | None = None,
        older_than: float | None = None,
        newer_than: float | None = None,
        ids: Sequence[str] | None = None,
        correlation_id: str | None = None,
    ) -> tuple[sql.Composable, list[Any]]:
        """A WHERE clause (fixed fragments, bound values) for job listings. ``ids``: only
        these jobs; ``correlation_id``: only the jobs of that request (indexed)."""
        parts: list[sql.Composable] = [sql.SQL("true")]
        params: list[Any] = []
        if states:
            parts.append(sql.SQL("state = ANY(%s)"))
            params.append(list(states))
        if ids is not None:
            parts.append(sql.SQL("id = ANY(%s::uuid[])"))
            params.append(list(ids))
        if task:
            parts.append(sql.SQL("task = %s"))
            params.append(task)
        if queue:
            parts.append(sql.SQL("queue = %s"))
            params.append(queue)
        if failure_class:
            parts.append(sql.SQL("failure_class = %s"))
            params.append(failure_class)
        if correlation_id is not None:
            parts.append(sql.SQL("correlation_id = %s"))
            params.append(correlation_id)
        if older_than is not None:
            parts.append(
                sql.SQL("coalesce(finished_at, enqueued_at) < now() - make_interval(secs => %s)")
            )
            params.append(older_than)
        if newer_than is not None:
            parts.append(
                sql.SQL("coalesce(finished_at, enqueued_at) >= now() - make_interval(secs => %s)")
            )
            params.append(newer_than)
        return sql.SQL(" AND ").join(parts), params

    def count_where(self, where: sql.Composable, params: Sequence[Any]) -> int:
        """How many jobs match a clause made by :meth:`filters`."""
        query = sql.SQL("SELECT count(*) FROM synth_jobs WHERE {where}").format(where=where)
        with self.reads.connection() as conn:
            row = conn.execute(query, params).fetchone()
        return int(row[0]) if row else 0

    def delete_where(self, where: sql.Composable, params: Sequence[Any]) -> int:
        """Delete the jobs matching a clause made by :meth:`filters`; return how many."""
        query = sql.SQL("DELETE FROM synth_jobs WHERE {where}").format(where=where)
        with self.connection() as conn:
            return conn.execute(query, params).rowcount

    @staticmethod
    def lock_replayable(
        conn: psycopg.Connection[Any], where: sql.Composable, params: Sequence[Any], limit: int
    ) -> list[tuple[Any, ...]]:
        """In ``conn``'s transaction, lock the jobs matching ``where`` that can be replayed
        (not refused messages), oldest death first; rows of ``(id, task, queue, priority,
        payload, args, user_id, message, correlation_id)``."""
        query = sql.SQL(
            "SELECT id, task, queue, priority, payload, args, user_id, message, correlation_id "
            "FROM synth_jobs WHERE {where} AND failure_class IS DISTINCT FROM %s "
            "ORDER BY finished_at LIMIT %s FOR UPDATE"
        ).format(where=where)
        return conn.execute(query, (*params, FailureClass.REJECTED_MESSAGE, limit)).fetchall()

    def apply_retention(
        self, *, dlq_max_age: float, dlq_max_count: int, job_ttl: float
    ) -> dict[str, int]:
        """Drop dead jobs older than ``dlq_max_age`` seconds or beyond the newest
        ``dlq_max_count``, finished jobs older than ``job_ttl``, expired idempotency keys,
        week-old periodic slots, waits older than ``job_ttl`` and the effects and stored events
        of jobs gone; return what was dropped."""
        dead = sql.Literal(JobState.DEAD)  # a constant: the partial index on dead jobs
        with self.connection() as conn:
            aged = conn.execute(
                sql.SQL(
                    "DELETE FROM synth_jobs WHERE state = {dead} AND "
                    "finished_at < now() - make_interval(secs => %s)"
                ).format(dead=dead),
                (dlq_max_age,),
            ).rowcount
            over = conn.execute(
                sql.SQL(
                    "DELETE FROM synth_jobs WHERE id IN (SELECT id FROM synth_jobs WHERE "
                    "state = {dead} ORDER BY finished_at DESC OFFSET %s)"
                ).format(dead=dead),
                (dlq_max_count,),
            ).rowcount
            finished = conn.execute(
                "DELETE FROM synth_jobs WHERE state = ANY(%s) AND "
                "finished_at < now() - make_interval(secs => %s)",
                ([JobState.SUCCEEDED, JobState.CANCELLED], job_ttl),
            ).rowcount
            conn.execute("DELETE FROM synth_idempotency WHERE expires_at < now()")
            conn.execute(
                "DELETE FROM synth_waits WHERE at < now() - make_interval(secs => %s)",
                (job_ttl,),
            )
            conn.execute(
                "DELETE FROM synth_periodic_slots WHERE created_at < now() - interval '7 days'"
            )
            conn.execute(
                "DELETE FROM synth_effects e WHERE NOT EXISTS "
                "(SELECT 1 FROM synth_jobs j WHERE j.id = e.job_id)"
            )
            conn.execute(  # stored events (ledger.history) of jobs gone
                "DELETE FROM synth_job_history h WHERE NOT EXISTS "
                "(SELECT 1 FROM synth_jobs j WHERE j.id = h.job_id)"
            )
        return {"dead_aged": aged, "dead_over_count": over, "finished": finished}

    def dead_summary(self) -> list[dict[str, Any]]:
        """Dead jobs per task and failure class, most first."""
        with self.reads.connection() as conn:
            rows = conn.execute(
                "SELECT task, failure_class, count(*), max(finished_at) FROM synth_jobs "
                "WHERE state = %s GROUP BY task, failure_class ORDER BY count(*) DESC",
                (JobState.DEAD,),
            ).fetchall()
        return [{"task": r[0], "failure_class": r[1], "count": r[2], "last": r[3]} for r in rows]

    def counts(self, *, last_hour: bool = False) -> LedgerCounts:
        """The cluster snapshot's counts, in four short statements (five with
        ``last_hour``: jobs per state enqueued in the last hour)."""
        with self.reads.connection() as conn:
            per_queue = conn.execute(
                "SELECT queue, count(*) FILTER (WHERE state = ANY(%(delayed)s)), "
                "extract(epoch FROM max(now() - coalesce(run_at, enqueued_at)) "
                "FILTER (WHERE state = %(queued)s)) FROM synth_jobs "
                "WHERE state = ANY(%(waiting)s) GROUP BY queue",
                {
                    "delayed": list(_DELAYED),
                    "queued": JobState.QUEUED,
                    "waiting": [*_DELAYED, JobState.QUEUED],
                },
            ).fetchall()
            unfinished = {s.value: 0 for s in UNFINISHED}
            for state, count in conn.execute(
                "SELECT state, count(*) FROM synth_jobs WHERE state = ANY(%s) GROUP BY state",
                (list(UNFINISHED),),
            ).fetchall():
                unfinished[state] = int(count)
            dlq_row = conn.execute(
                "SELECT count(*) FROM synth_jobs WHERE state = %s", (JobState.DEAD,)
            ).fetchone()
            beat_row = conn.execute(
                "SELECT extract(epoch FROM max(created_at)) FROM synth_periodic_slots"
            ).fetchone()
            hour: dict[str, int] = {}
            if last_hour:
                hour = {s.value: 0 for s in _ALL}
                for state, count in conn.execute(
                    "SELECT state, count(*) FROM synth_jobs WHERE enqueued_at >= now() - "
                    "interval '1 hour' GROUP BY state"
                ).fetchall():
                    hour[state] = int(count)
        return LedgerCounts(
            queues={
                row[0]: QueueCounts(
                    delayed=int(row[1]),
                    oldest_age_seconds=round(float(row[2]), 3) if row[2] else None,
                )
                for row in per_queue
            },
            unfinished=unfinished,
            dlq_size=int(dlq_row[0]) if dlq_row else 0,
            beat_last_slot=float(beat_row[0]) if beat_row and beat_row[0] else None,
            last_hour=hour,
        )

    @staticmethod
    def take_periodic_slot(
        conn: psycopg.Connection[Any], name: str, slot: datetime, job_id: str
    ) -> bool:
        """In ``conn``'s transaction, take ``(name, slot)`` for ``job_id``; False when
        another beat took it first."""
        return (
            conn.execute(
                "INSERT INTO synth_periodic_slots (name, slot, job_id) VALUES (%s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                (name, slot, job_id),
            ).rowcount
            == 1
        )
