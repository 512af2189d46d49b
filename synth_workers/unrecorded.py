"""A delivered message whose job has no ledger row: adopted as a job sent around the
platform, or, when the platform published it before its row committed, taken as that row
(``synth_workers.ledger.early``).

- **Sent around the platform** (Celery's ``send_task``, another producer): the message is
  adopted, its message kept whole (canvas, ids, retries) for any re-publish, then claimed.
- **Published before its row** (marked :data:`~synth_workers.ledger.early.EARLY`): never
  adopted. A row that committed between the claim and the look for it is claimed again.
  With no row, a tombstone is written unless the enqueue's row commits, which it waits for
  while the enqueue's ``INSERT`` is in flight; the row is then claimed, or the message
  dropped (:class:`Ignore`): a job whose enqueue raised never runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery.exceptions import Ignore

from synth_workers import correlation
from synth_workers.ledger.early import EARLY, tombstone_early
from synth_workers.ledger.store import Publishable
from synth_workers.ledger.transport import publish
from synth_workers.message import from_request
from synth_workers.routing import foreign_priority, queue_for_task
from synth_workers.states import JobState

if TYPE_CHECKING:
    from synth_workers.ledger.store import Claim
    from synth_workers.task import Task


def take(
    task: Task, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any], owner: str
) -> Claim | None:
    """Delivered job ``request.id`` was not claimed: when it has no row, give it one and
    claim it for ``owner``; when it was published before its row and the row committed
    since the claim looked, claim it. ``None``: the job is not to run (not queued); raises
    :class:`Ignore` when the message is not to be run now."""
    ledger = task.platform.ledger
    properties = request.properties or {}
    row = ledger.get(request.id)
    if row is not None:
        if properties.get(EARLY) and row["state"] == JobState.QUEUED:
            return ledger.claim(request.id, owner)
        return None
    if properties.get(EARLY):
        info = request.delivery_info or {}
        queue = str(info.get("routing_key") or queue_for_task(task.name))
        level = foreign_priority(properties.get("priority"))
        if tombstone_early(ledger, request.id, task.name, queue, level):
            raise Ignore(f"job {request.id}: its enqueue did not commit its row; not run")
    else:
        _adopt(task, request, args, kwargs)
    return ledger.claim(request.id, owner)


def _adopt(task: Task, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Give a ledger row to a message sent around the platform. One sent without a
    priority (kombu files it as 0, its most urgent list, ahead of ``high``) is recorded
    ``normal`` and re-filed on the normal list instead of run now (:class:`Ignore`), so
    that it does not jump the queue; it runs when its turn comes."""
    raw = (request.properties or {}).get("priority")
    level = foreign_priority(raw)
    info = request.delivery_info if request.delivery_info is not None else {}
    info["priority"] = level  # what the ledger records, not kombu's 0
    job = Publishable(
        request.id,
        task.name,
        str(info.get("routing_key") or queue_for_task(task.name)),
        level,
        dict(kwargs),
        list(args) or None,
        message=from_request(request),
        retries=int(request.retries or 0),
    )
    adopted = task.platform.ledger.adopt(
        job.id,
        job.task,
        job.queue,
        job.priority,
        job.payload,
        job.args,
        message=job.message,
        retries=job.retries,
        correlation_id=correlation.of_request(request),
    )
    if adopted and not (isinstance(raw, int) and raw > 0):
        publish(task.app, [job])
        raise Ignore(f"job {request.id} was sent without a priority: re-filed as normal")
