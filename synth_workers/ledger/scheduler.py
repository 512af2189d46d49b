"""Beat scheduler that enqueues each periodic slot exactly once, however many beats run.

A slot is the schedule's due time rounded down to its period (an interval's multiple, a
crontab's minute). Before sending, the scheduler inserts ``(entry name, slot)`` into
``synth_periodic_slots`` and the job row in one transaction (the outbox path); a second beat
that reaches the same slot finds the row and sends nothing.

The job is sent as Celery's own scheduler sends it: ``task.apply_async(args, kwargs,
**options)`` with the entry's ``args``, ``kwargs`` (lazy values evaluated, as Celery does)
and ``options`` (``priority``, ``queue``, ``expires``...), so an entry with positional
``args`` runs like any Celery beat entry.

Liveness: after every tick the scheduler rewrites ``SYNTH_BEAT_HEARTBEAT_FILE`` and sleeps at
most ``SYNTH_HEALTH_INTERVAL`` seconds before the next, so ``synth-workers health beat`` fails
within two intervals of beat stopping or hanging in a tick (``synth_workers.heartbeat``).
"""

from __future__ import annotations

import logging
import math
import socket
import uuid
from datetime import UTC, datetime
from typing import Any, cast

from celery.beat import (  # type: ignore[attr-defined]
    PersistentScheduler,
    ScheduleEntry,
    _evaluate_entry_args,
    _evaluate_entry_kwargs,
)
from celery.schedules import crontab, schedule

from synth_workers.errors import UnknownTaskError
from synth_workers.heartbeat import LoopHeartbeat
from synth_workers.platform import platform_of
from synth_workers.task import Task

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
    """Celery's persistent scheduler, sending each slot of each entry once (see above)."""

    _heartbeat: LoopHeartbeat | None = None

    @property
    def heartbeat(self) -> LoopHeartbeat:
        """Beat's heartbeat (``SYNTH_BEAT_HEARTBEAT_FILE``, every ``SYNTH_HEALTH_INTERVAL``)."""
        if self._heartbeat is None:
            settings = platform_of(self.app).settings
            self._heartbeat = LoopHeartbeat(
                settings.beat_heartbeat_file,
                settings.health_interval,
                f"beat@{socket.gethostname()}",
            )
        return self._heartbeat

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One turn of beat's loop (Celery's), then the heartbeat; the next turn comes within
        the heartbeat interval even when no entry is due sooner."""
        interval = float(super().tick(*args, **kwargs))
        self.heartbeat.beat()
        return self.heartbeat.cap(interval)

    def _task(self, name: str) -> Task:
        task = self.app.tasks.get(name)
        if task is None:
            self.app.loader.import_default_modules()
            task = self.app.tasks.get(name)
        if not isinstance(task, Task):
            raise UnknownTaskError(
                f"beat entry's task {name!r} is not registered on the app (add its module to "
                "SYNTH_INCLUDE)"
            )
        return task

    def apply_async(
        self, entry: ScheduleEntry, producer: Any = None, advance: bool = True, **kwargs: Any
    ) -> Any:
        if advance:
            entry = cast(ScheduleEntry, self.reserve(entry))
        task = self._task(str(entry.task))
        args = _evaluate_entry_args(entry.args)
        entry_kwargs = _evaluate_entry_kwargs(entry.kwargs)
        options = dict(entry.options or {})
        options.setdefault("headers", {})["celery_beat_task"] = True
        slot = slot_of(entry, datetime.now(UTC))
        job_id = str(uuid.uuid4())
        ledger = platform_of(self.app).ledger
        with ledger.connection() as conn, conn.transaction():
            taken = ledger.take_periodic_slot(conn, str(entry.name), slot, job_id)
            if taken:
                task.apply_async(args, entry_kwargs, task_id=job_id, synth_conn=conn, **options)
        if taken:
            log.info("beat: slot %s of %s enqueued as %s", slot.isoformat(), entry.name, job_id)
        else:
            log.info(
                "beat: slot %s of %s already enqueued by another beat", slot.isoformat(), entry.name
            )
        return self.app.AsyncResult(job_id)
