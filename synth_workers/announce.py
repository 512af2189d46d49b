"""Waking Celery's result waiters: after the ledger commits a job's final state, one PUBLISH
on the job's result channel (Celery's ``celery-task-meta-<id>``) tells whoever waits on it
(``synth_workers.resultconsumer.ResultConsumer`` then reads the ledger row).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from synth_workers.backend import BACKEND_CLASS
from synth_workers.batchwriter import BatchWriter
from synth_workers.lifecycle import JobEvent
from synth_workers.resultconsumer import NOTICE
from synth_workers.resultmeta import FINAL_ANNOUNCEMENTS


class ResultAnnouncer(BatchWriter[tuple[str, str]]):
    """Lifecycle listener: tells waiters on Celery's result channel that a job reached a
    final state, after the ledger committed it (one PUBLISH per job, pipelined per batch).
    A success is announced only when someone waits on it (``get()``/``then()`` marked the
    job ``waited`` before subscribing; the completion statement returns the mark): the hot
    path of jobs nobody waits on publishes nothing."""

    name = "synth-result-announcer"
    batch = 200

    def __init__(self, app: Celery) -> None:
        # No linger: what it announces is already batched (a completion statement's jobs
        # are added together), and a waiter is waiting for it.
        super().__init__(linger=0.0)
        self.app = app

    def __call__(self, event: JobEvent) -> None:
        status = FINAL_ANNOUNCEMENTS.get(event.kind)
        if status is None or event.data.get("waited") is False:
            return  # a success nobody waits on (the completion said so): nothing to say
        self.add((event.job_id, status))

    def write_batch(self, batch: list[tuple[str, str]]) -> None:
        backend: Any = self.app.backend
        with backend.client.pipeline(transaction=False) as pipe:
            for job_id, status in batch:
                notice = {"task_id": job_id, "status": status, "result": None, NOTICE: True}
                pipe.publish(backend.get_key_for_task(job_id), backend.encode(notice))
            pipe.execute()


def connect_results(app: Celery, lifecycle: Any) -> ResultAnnouncer:
    """Make the ledger ``app``'s result backend and announce final states to waiters.

    The caller (``install``) flushes the returned announcer when a worker process stops,
    after the completions it announces."""
    app.backend_cls = BACKEND_CLASS
    announcer = ResultAnnouncer(app)
    lifecycle.connect(announcer)
    return announcer
