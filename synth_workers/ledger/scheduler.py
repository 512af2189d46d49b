"""Beat scheduler that enqueues each periodic slot exactly once, however many beats run.

A slot is the schedule's due time rounded down to its period (an interval's multiple, a
crontab's minute). Before sending, the scheduler inserts ``(entry name, slot)`` into
``synth_periodic_slots`` and the job row in one transaction (the outbox path); a second beat
that reaches the same slot finds the row and sends nothing.
"""

from __future__ import annotations

import logging
import math
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, cast

from celery.beat import PersistentScheduler, ScheduleEntry
from celery.schedules import crontab, schedule

from synth_workers.producer import enqueue

if TYPE_CHECKING:
    from synth_workers.app import SynthCelery

log = logging.getLogger(__name__)


def slot_of(entry: ScheduleEntry, now: datetime) -> datetime:
    """The slot ``now`` falls in for ``entry``'s schedule."""
    sched = entry.schedule
    ts = now.timestamp()
    if isinstance(sched, crontab):
        return datetime.fromtimestamp(math.floor(ts / 60) * 60, UTC)
    if isinstance(sched, schedule):
        period = max(float(sched.seconds), 1.0)
        return datetime.fromtimestamp(math.floor(ts / period) * period, UTC)
    return datetime.fromtimestamp(math.floor(ts), UTC)


class ExactlyOnceScheduler(PersistentScheduler):
    def apply_async(
        self, entry: ScheduleEntry, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> Any:
        if advance:
            entry = cast(ScheduleEntry, self.reserve(entry))
        app = cast("SynthCelery", self.app)
        slot = slot_of(entry, datetime.now(UTC))
        options = dict(entry.options or {})
        job_id = str(uuid.uuid4())
        ledger = app.ledger
        with ledger.connection() as conn, conn.transaction():
            taken = (
                conn.execute(
                    "INSERT INTO synth_periodic_slots (name, slot, job_id) VALUES (%s, %s, %s) "
                    "ON CONFLICT DO NOTHING",
                    (entry.name, slot, job_id),
                ).rowcount
                == 1
            )
            if taken:
                enqueue(
                    str(entry.task),
                    dict(entry.kwargs or {}),
                    priority=options.get("priority"),
                    queue=options.get("queue"),
                    app=app,
                    conn=conn,
                    job_id=job_id,
                )
        if taken:
            log.info("beat: slot %s of %s enqueued as %s", slot.isoformat(), entry.name, job_id)
        else:
            log.info(
                "beat: slot %s of %s already enqueued by another beat", slot.isoformat(), entry.name
            )
        return app.AsyncResult(job_id)
