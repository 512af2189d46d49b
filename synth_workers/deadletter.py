"""The dead-letter queue: dead jobs in the ledger, and what can be done with them.

A job is dead after its last attempt, at once for ``PermanentError`` and invalid payloads,
as a poison pill (it killed ``SYNTH_POISON_PILL_LOSSES`` workers), or as a message a worker
refused. Its row keeps the payload, attempts, failure class and traceback. Replay enqueues a
new job with the same task, payload, queue and priority, the same Celery message (canvas,
``link``/``link_error``, root and parent ids, request id; a new id and ``retries`` 0), a fresh
attempt budget, and ``replay_of`` pointing at the original. Retention keeps at most
``SYNTH_DLQ_MAX_COUNT`` dead jobs, none older than ``SYNTH_DLQ_MAX_AGE``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from synth_workers.ledger.transport import publish
from synth_workers.states import FailureClass, JobState

if TYPE_CHECKING:
    from psycopg import sql

    from synth_workers.app import SynthCelery

#: The failure classes a filter may name (``states.FailureClass``'s values).
FAILURE_CLASSES = tuple(c.value for c in FailureClass)


@dataclass(frozen=True)
class DLQFilter:
    """Which dead jobs an operation applies to."""

    task: str | None = None
    queue: str | None = None
    failure_class: str | None = None
    older_than: float | None = None  # seconds since it died
    newer_than: float | None = None

    def where(self) -> tuple[sql.Composable, list[Any]]:
        """The ledger filter (see ``Ledger.filters``) for the dead jobs this one names."""
        from synth_workers.ledger.store import Ledger

        if self.failure_class is not None and self.failure_class not in FAILURE_CLASSES:
            raise ValueError(f"failure class must be one of {', '.join(FAILURE_CLASSES)}")
        return Ledger.filters(
            states=(JobState.DEAD,),
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
        return self.ledger.count_where(clause, params)

    def show(self, job_id: str) -> dict[str, Any] | None:
        row = self.ledger.get(job_id)
        return row if row is not None and row["state"] == JobState.DEAD else None

    def replay(
        self, ids: list[str] | None = None, where: DLQFilter | None = None, limit: int = 10_000
    ) -> list[tuple[str, str]]:
        """Re-enqueue dead jobs (by id, or by filter); return (original id, new id) pairs."""
        clause, params = self._chosen(ids, where)
        pairs: list[tuple[str, str]] = []
        with self.ledger.connection() as conn, conn.transaction():
            rows = self.ledger.lock_replayable(conn, clause, params, limit)
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
                    correlation_id=row[8],
                )
                pairs.append((str(row[0]), new_id))
        # Published by the sweeper's outbox relay too; publishing here saves the wait.
        if pairs:
            publish(self.app, self.ledger.take_outbox())
        return pairs

    def purge(self, ids: list[str] | None = None, where: DLQFilter | None = None) -> int:
        """Delete dead jobs (by id, or by filter); return how many."""
        clause, params = self._chosen(ids, where)
        return self.ledger.delete_where(clause, params)

    @staticmethod
    def _chosen(ids: list[str] | None, where: DLQFilter | None) -> tuple[sql.Composable, list[Any]]:
        """The dead jobs ``ids`` names, or else those ``where`` matches."""
        if ids is not None:
            from synth_workers.ledger.store import Ledger

            return Ledger.filters(states=(JobState.DEAD,), ids=ids)
        return (where or DLQFilter()).where()

    def apply_retention(self) -> dict[str, int]:
        """Drop dead jobs over the age and count limits, and finished jobs past SYNTH_JOB_TTL."""
        s = self.app.settings
        return self.ledger.apply_retention(
            dlq_max_age=s.dlq_max_age, dlq_max_count=s.dlq_max_count, job_ttl=s.job_ttl
        )

    def summary(self) -> list[dict[str, Any]]:
        """Dead jobs per task and failure class (the daily digest's table)."""
        return self.ledger.dead_summary()
