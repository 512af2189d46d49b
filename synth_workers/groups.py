"""``group(...).apply_async()`` through the bulk path: one ``INSERT`` and one Redis pipeline
per chunk of members, instead of one Celery send (and one insert, one publish) per member.

Celery's ``group.apply_async`` freezes the group (its id, each member's id, index and root),
then calls every member's ``apply_async`` with the group's options and builds a
``GroupResult`` whose barrier each member's result joins. For a group this module can
send in bulk, :func:`apply_async` does the same freezing and the same results, but writes the
members as :func:`~synth_workers.bulk.enqueue_many` writes jobs: every member checked first
(its payload's size and strict JSON, Celery's argument check), then their rows in one
statement and their messages (Celery's, byte for byte: ``tests/test_groups.py``) with their
``queued`` events in one pipeline. All or nothing: one refused member refuses the group and
nothing is written. The rows and the messages overlap as in ``enqueue_many``
(``synth_workers.bulkrows.overlapped``; each message then carries the mark of one published
before its row). Should Redis fail after the commit, the members are recorded and queued
in the ledger and the reconciler publishes them (the group's result is still returned).

What goes this way: a group applied at the top level (not from a running task, not eager,
no outbox transaction open) with no arguments added, no producer and no options but
``queue`` and ``priority``, whose members are plain signatures of one platform task with
the same options, ``queue`` and ``priority`` only, for a task whose queue does not depend
on the arguments (the app's routes are name maps or the platform's own ``route_task``) and
whose message :func:`synth_workers.wire.build` makes. Every other group is Celery's own.
"""

from __future__ import annotations

import threading
from typing import Any

from celery.app.routes import MapRoute
from celery.canvas import Signature
from celery.canvas import group as celery_group
from celery.utils import uuid
from vine import barrier

from synth_workers import bulk, bulkrows, correlation, outbox, wire, wiremany
from synth_workers.errors import PayloadTooLargeError, PayloadValidationError
from synth_workers.platform import find_platform
from synth_workers.publish import placement, queue_name
from synth_workers.resultconsumer import ResultConsumer
from synth_workers.routing import route_task, to_transport
from synth_workers.uuids import uuid4s
from synth_workers.validation import payload_size

#: Celery's own ``group.apply_async``, for every group not sent here.
_celery_apply_async = celery_group.apply_async
_lock = threading.Lock()
#: The options members may have (the same for all of them) for the group to go in bulk.
MEMBER_OPTIONS = frozenset({"queue", "priority"})


def install() -> None:
    """Route ``group.apply_async`` through :func:`apply_async` (once per process; a group
    of an app that is not a platform app is Celery's own, unchanged)."""
    with _lock:
        if celery_group.apply_async is not apply_async:
            celery_group.apply_async = apply_async  # type: ignore[method-assign]


def apply_async(
    self: celery_group,
    args: Any = None,
    kwargs: Any = None,
    add_to_parent: bool = True,
    producer: Any = None,
    link: Any = None,
    link_error: Any = None,
    **options: Any,
) -> Any:
    """Celery's ``group.apply_async``; in bulk where :func:`_task_of` allows it."""
    given = {**self.options, **options}  # Celery's _freeze_gid: the call's over the group's
    if not (args or kwargs or producer or link or link_error or given.keys() - MEMBER_OPTIONS):
        task = _task_of(self)
        if task is not None:
            # Celery's Signature.apply_async: a member's options under those given (not None)
            return _send(self, task, {k: v for k, v in given.items() if v is not None})
    return _celery_apply_async(
        self, args, kwargs, add_to_parent, producer, link, link_error, **options
    )


def _task_of(group: Any) -> Any:
    """The one platform task every member of ``group`` is a plain signature of, when this
    group can be sent in bulk (see the module docstring); else ``None``."""
    app = group.app
    if find_platform(app) is None or app.current_worker_task is not None:
        return None
    if app.conf.task_always_eager or outbox.current() is not None:
        return None
    members = group.tasks
    if not members or any(type(sig) is not Signature for sig in members):
        return None  # none, or a group, chain, chord or plain dict among them
    name, shared = members[0].task, members[0].options
    if shared.keys() - MEMBER_OPTIONS:
        return None
    for sig in members:
        if sig.subtask_type or sig.task != name or sig.options != shared:
            return None
    task = app.tasks.get(str(name))
    if task is None or getattr(task, "platform", None) is None:
        return None
    if getattr(task, "_dump_pydantic_arguments", None) is not None:
        return None  # Celery's pydantic=True: its dumps are made per send
    router: Any = app.amqp.router
    if not all(isinstance(route, MapRoute) or route is route_task for route in router.routes):
        return None  # a router function may route each member on its arguments
    if not wire.eligible(task, {}):
        return None
    return task


def _send(group: Any, task: Any, given: dict[str, Any]) -> Any:
    """Freeze ``group`` as Celery does, write and publish its members in bulk (``given``:
    the group's and the call's ``queue`` and ``priority``, over the members' own), and return
    its ``GroupResult`` (each member's result joined to its barrier, as Celery's)."""
    app = group.app
    _options, group_id, _root_id = group._freeze_gid(dict(given))
    calls = [(tuple(sig.args or ()), dict(sig.kwargs or {})) for sig in group.tasks]
    _check(task, calls)
    # the placement Task.apply_async gives each member (synth_workers.publish.send)
    send_options = {**group.tasks[0].options, **given}
    level = send_options.pop("priority", None)
    placed = placement(
        task, task.priority if level is None else level, send_options.get("queue") or None
    )
    corr = correlation.for_send(send_options)
    send_options["priority"] = to_transport(placed.priority)
    named = queue_name(send_options.get("queue") or getattr(task, "queue", None))
    if placed.queue is not None and placed.queue != named:
        send_options["queue"] = placed.queue
    # the first member's message, before anything is frozen: each member's is a copy of it
    args0, kwargs0 = calls[0]
    model = wire.build(task, args0, kwargs0, {**send_options, "task_id": uuid()}, (group_id, 0))
    if model is None:  # a send build() does not make (time limits Celery refuses, ...)
        return _celery_apply_async(group, **given)
    # Celery's group._prepared freezes a copy of each member: a new id, its result
    ids = uuid4s(len(calls))
    results = [task.AsyncResult(job_id) for job_id in ids]
    limits = wiremany.repr_limits(app)
    outs = [
        wiremany.sibling(model, app, ids[n], a, k, limits, group_index=n)
        for n, (a, k) in enumerate(calls)
    ]
    target = placed.queue or model.routing_key
    bulk.check_redis(app)
    batch = bulkrows.Batch(task, target, placed.priority, corr=corr)
    kwargs, args = [k for _a, k in calls], [a for a, _k in calls]
    if task.platform.ledger.durable_commits:  # the rows written while the members publish
        bulkrows.overlapped(batch, ids, lambda s, e: (outs[s:e], kwargs[s:e], args[s:e]))
    else:
        stored = [out.stored() for out in outs]
        bulkrows.insert_rows(batch, None, ids, [None] * len(ids), kwargs, stored, args)
        bulkrows.publish(batch, ids, range(len(ids)), outs, None)
    # Celery's group.apply_async: each member's result joins the barrier, then the result
    consumer = getattr(app.backend, "result_consumer", None)
    if isinstance(consumer, ResultConsumer):  # the members' channels in one SUBSCRIBE
        consumer.consume_many(ids)
    ready: Any = barrier()
    for res in results:
        if not ready.cancelled and not ready.ready:
            ready.size += 1
            res.then(ready, weak=True)
    result = app.GroupResult(group_id, results, ready_barrier=ready)
    ready.finalize()
    return result


def _check(task: Any, calls: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> None:
    """Every member's send would pass ``Task.apply_async``'s checks: Celery's argument check
    (``TypeError``, as Celery raises it) and the payload's strict JSON and size."""
    header = getattr(task, "__header__", None) if task.typing else None
    cap = task.platform.settings.max_payload_bytes
    for index, (args, kwargs) in enumerate(calls):
        if header is not None:
            try:
                header(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"group member {index}: {exc}") from exc
        try:
            size = payload_size(args, kwargs)
        except PayloadValidationError as exc:
            raise PayloadValidationError(f"group member {index}: {exc}") from None
        if size > cap:
            raise PayloadTooLargeError(
                f"group member {index}: {task.name}: payload is {size} bytes, over the "
                f"{cap}-byte cap (SYNTH_MAX_PAYLOAD_BYTES); store large inputs elsewhere and "
                "pass a reference"
            )
