"""The dead-letter queue: dead jobs in the ledger, and what can be done with them.

A job is dead after its last attempt, at once for ``PermanentError`` and invalid payloads,
as a poison pill (it killed ``SYNTH_POISON_PILL_LOSSES`` workers), or as a message a worker
refused. Its row keeps the payload, attempts, failure class and traceback. Replay enqueues a
new job with the same task, payload, queue and priority, the same Celery message (canvas,
``link``/``link_error``, root and parent ids; a new id and ``retries`` 0), a fresh attempt
budget, and ``replay_of`` pointing at the original. Retention keeps at most
``SYNTH_DLQ_MAX_COUNT`` dead jobs, none older than ``SYNTH_DLQ_MAX_AGE``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from synth_workers.ledger.transport import publish

if TYPE_CHECKING:
    from synth_workers.app import SynthCelery

FAILURE_CLASSES = (
    "exception",
    "soft_timeout",
    "hard_timeout",
    "worker_lost",
    "poison_pill",
    "rejected_message",
    "rate_limited",
    "invalid_payload",
)


@dataclass(frozen=True)
class DLQFilter:
    """Which dead jobs an operation applies to."""

    task: str | None = None
    queue: str | None = None
    failure_class: str | None = None
    older_than: float | None = None  # seconds since it died
    newer_than: float | None = None

    def where(self) -> tuple[str, list[Any]]:
        from synth_workers.ledger.store import Ledger

        if self.failure_class is not None and self.failure_class not in FAILURE_CLASSES:
            raise ValueError(f"failure class must be one of {', '.join(FAILURE_CLASSES)}")
        return Ledger.filters(
            states=("dead",),
            task=self.task,
            queue=self.queue,
            failure_class=self.failure_class,
            older_than=self.older_than,
            newer_than=self.newer_than,
        )


class DeadLetterQueue:
    def __init__(self, app: SynthCelery) -> None:
        self.app = app
        self.ledger = app.ledger

    def list_dead(self, where: DLQFilter | None = None, limit: int = 100) -> list[dict[str, Any]]:
        clause, params = (where or DLQFilter()).where()
        return self.ledger.list_where(clause, params, limit)

    def count(self, where: DLQFilter | None = None) -> int:
        clause, params = (where or DLQFilter()).where()
        with self.ledger.connection() as conn:
            row = conn.execute(
                f"SELECT count(*) FROM synth_jobs WHERE {clause}",  # noqa: S608 - fixed parts
                params,
            ).fetchone()
        return int(row[0]) if row else 0

    def show(self, job_id: str) -> dict[str, Any] | None:
        row = self.ledger.get(job_id)
        return row if row is not None and row["state"] == "dead" else None

    def replay(
        self, ids: list[str] | None = None, where: DLQFilter | None = None, limit: int = 10_000
    ) -> list[tuple[str, str]]:
        """Re-enqueue dead jobs (by id, or by filter); return (original id, new id) pairs."""
        if ids is not None:
            clause, params = "state = 'dead' AND id = ANY(%s::uuid[])", [ids]
        else:
            clause, params = (where or DLQFilter()).where()
        pairs: list[tuple[str, str]] = []
        with self.ledger.connection() as conn, conn.transaction():
            rows = conn.execute(
                "SELECT id, task, queue, priority, payload, args, user_id, message "  # noqa: S608
                f"FROM synth_jobs WHERE {clause} "
                "AND failure_class IS DISTINCT FROM 'rejected_message' "
                "ORDER BY finished_at LIMIT %s FOR UPDATE",
                [*params, limit],
            ).fetchall()
            for row in rows:
                new_id = str(uuid.uuid4())
                self.ledger.insert_job(
                    conn,
                    job_id=new_id,
                    task=row[1],
                    queue=row[2],
                    priority=row[3],
                    payload=row[4],
                    args=row[5],
                    delay=None,
                    idempotency_key=None,
                    max_attempts=None,
                    published=False,
                    replay_of=str(row[0]),
                    user_id=row[6],
                    message=row[7],
                )
                pairs.append((str(row[0]), new_id))
        # Published by the sweeper's outbox relay too; publishing here saves the wait.
        if pairs:
            publish(self.app, self.ledger.take_outbox())
        return pairs

    def purge(self, ids: list[str] | None = None, where: DLQFilter | None = None) -> int:
        """Delete dead jobs (by id, or by filter); return how many."""
        if ids is not None:
            clause, params = "state = 'dead' AND id = ANY(%s::uuid[])", [ids]
        else:
            clause, params = (where or DLQFilter()).where()
        with self.ledger.connection() as conn:
            return conn.execute(
                f"DELETE FROM synth_jobs WHERE {clause}",  # noqa: S608 - fixed parts
                params,
            ).rowcount

    def apply_retention(self) -> dict[str, int]:
        """Drop dead jobs over the age and count limits, and finished jobs past SYNTH_JOB_TTL."""
        s = self.app.settings
        with self.ledger.connection() as conn:
            aged = conn.execute(
                "DELETE FROM synth_jobs WHERE state = 'dead' AND "
                "finished_at < now() - make_interval(secs => %s)",
                (s.dlq_max_age,),
            ).rowcount
            over = conn.execute(
                "DELETE FROM synth_jobs WHERE id IN (SELECT id FROM synth_jobs WHERE state = "
                "'dead' ORDER BY finished_at DESC OFFSET %s)",
                (s.dlq_max_count,),
            ).rowcount
            finished = conn.execute(
                "DELETE FROM synth_jobs WHERE state IN ('succeeded', 'cancelled') AND "
                "finished_at < now() - make_interval(secs => %s)",
                (s.job_ttl,),
            ).rowcount
            conn.execute("DELETE FROM synth_idempotency WHERE expires_at < now()")
            conn.execute(
                "DELETE FROM synth_periodic_slots WHERE created_at < now() - interval '7 days'"
            )
            conn.execute(
                "DELETE FROM synth_effects e WHERE NOT EXISTS "
                "(SELECT 1 FROM synth_jobs j WHERE j.id = e.job_id)"
            )
        return {"dead_aged": aged, "dead_over_count": over, "finished": finished}

    def summary(self) -> list[dict[str, Any]]:
        """Dead jobs per task and failure class (the daily digest's table)."""
        with self.ledger.connection() as conn:
            rows = conn.execute(
                "SELECT task, failure_class, count(*), max(finished_at) FROM synth_jobs "
                "WHERE state = 'dead' GROUP BY task, failure_class ORDER BY count(*) DESC"
            ).fetchall()
        return [{"task": r[0], "failure_class": r[1], "count": r[2], "last": r[3]} for r in rows]
