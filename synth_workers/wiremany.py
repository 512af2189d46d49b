"""Many messages of one task at once (bulk enqueue, a group's members): the first built by
:func:`synth_workers.wire.build`, each other one copied from it with its own ids, arguments
and reprs (:func:`sibling`), which costs a fraction of building it."""

from __future__ import annotations

from typing import Any

from synth_workers.reprs import fast_saferepr
from synth_workers.wire import Outgoing

#: Celery's sizes of the argument reprs in a message (:func:`repr_limits`).
Limits = tuple[int, int, int]


def sibling(
    first: Outgoing,
    app: Any,
    job_id: str,
    args: Any,
    kwargs: Any,
    limits: Limits | None = None,
    group_index: int | None = None,
) -> Outgoing:
    """The message :func:`~synth_workers.wire.build` makes for the same task and options
    as ``first`` with another id and other arguments, without building it again (only the
    ids, the arguments and their reprs differ, and ``group_index`` for a group's member);
    only for a send whose queue does not depend on the arguments (given, or routed by name
    alone: a router function may route on them). ``limits``: :func:`repr_limits`, read
    once for many."""
    args_max, kwargs_max, maxlevels = limits or repr_limits(app)
    args = args or ()
    headers = dict(first.headers)
    headers["id"] = headers["root_id"] = job_id
    if group_index is not None:
        headers["group_index"] = group_index
    headers["argsrepr"] = fast_saferepr(args, args_max, maxlevels)
    headers["kwargsrepr"] = fast_saferepr(kwargs, kwargs_max, maxlevels)
    properties = dict(first.properties)
    properties["correlation_id"] = job_id
    return Outgoing(
        job_id=job_id,
        headers=headers,
        properties=properties,
        body=(args, kwargs, dict(first.body[2])),
        queue=first.queue,
        routing_key=first.routing_key,
        priority=first.priority,
        delivery_mode=first.delivery_mode,
        serializer=first.serializer,
        ignore_result=first.ignore_result,
        family=first.family or first,
    )


def repr_limits(app: Any) -> Limits:
    """The sizes of the argument reprs Celery puts in a message's headers: its AMQP's
    ``argsrepr_maxsize`` and ``kwargsrepr_maxsize``, and ``task_repr_maxlevels``."""
    amqp = app.amqp
    return amqp.argsrepr_maxsize, amqp.kwargsrepr_maxsize, app.conf.task_repr_maxlevels
