"""Publishing ledger jobs to Redis, and finding which queued jobs Redis still holds."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from celery.app.amqp import task_message

from synth_workers.batched import ALONE_HEADER
from synth_workers.message import for_publish
from synth_workers.platform import platform_of
from synth_workers.routing import MAX_PRIORITY, MIN_PRIORITY, to_transport

if TYPE_CHECKING:
    from celery import Celery

    from synth_workers.app import SynthCelery
    from synth_workers.ledger.store import Publishable

#: kombu's Redis transport: the priority sub-list separator.
PRIORITY_SEP = "\x06\x16"


def publish(app: Celery, jobs: Sequence[Publishable]) -> None:
    """Send each job's message again: the Celery message the ledger kept (canvas, ids,
    expires, time limits, stamps as sent; see ``synth_workers.message``) with only the id,
    ``retries``, ``eta`` and routing (the row's queue and priority) updated, and marked to
    run alone when its last worker was lost (:attr:`~.Publishable.alone`). A row from before
    messages were kept is sent as a new message with the same id, payload, queue and
    priority."""
    if not jobs:
        return
    send = app.amqp.send_task_message
    with app.producer_or_acquire() as producer:
        for job in jobs:
            if job.message is not None:
                headers, properties, body = for_publish(
                    job.message, job.id, job.retries, job.args, job.payload, job.eta
                )
                if job.alone:
                    headers[ALONE_HEADER] = True
                send(
                    producer,
                    job.task,
                    task_message(headers, properties, body, None),
                    queue=job.queue,
                    priority=to_transport(job.priority),
                )
                continue
            app.send_task(
                job.task,
                args=job.args or (),
                kwargs=job.payload,
                task_id=job.id,
                queue=job.queue,
                priority=to_transport(job.priority),
                producer=producer,
                headers={ALONE_HEADER: True} if job.alone else None,
            )


def priority_lists(queue: str) -> list[str]:
    """Every Redis list of ``queue``: one per priority step."""
    return [
        queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}"
        for step in range(MIN_PRIORITY, MAX_PRIORITY + 1)
    ]


def _message_id(raw: bytes | str) -> str | None:
    try:
        message: Any = json.loads(raw)
    except ValueError:
        return None
    if isinstance(message, list) and message:  # unacked entries: [message, exchange, key]
        message = message[0]
    if not isinstance(message, dict):
        return None
    headers = message.get("headers") or {}
    job_id = headers.get("id") if isinstance(headers, dict) else None
    return str(job_id) if job_id else None


def ids_in_redis(
    app: SynthCelery, queues: Iterable[str], wanted: set[str], chunk: int = 1000
) -> set[str]:
    """Which of the ``wanted`` job ids still have a message waiting in one of ``queues``.

    Lists are read from their tail (the oldest messages, where long-queued jobs are) in
    chunks, stopping once every wanted id is found. Messages delivered but unacked are not
    counted: a job still *queued* in the ledger well after its message was delivered was
    taken by a worker that died before claiming it (its message would come back only after
    the visibility timeout), so it is published again; should that worker be alive after
    all, the second delivery's claim is refused.
    """
    client = platform_of(app).redis
    found: set[str] = set()
    for queue in set(queues):
        for key in priority_lists(queue):
            end = -1
            while found < wanted:
                items = client.lrange(key, end - chunk + 1, end)
                if not items:
                    break
                for raw in items:
                    job_id = _message_id(raw)
                    if job_id in wanted:
                        found.add(job_id)
                if len(items) < chunk:
                    break
                end -= chunk
            if found >= wanted:
                return found
    return found
