"""The fast send: a job's Celery message built as Celery's ``send_task`` builds it, and
written to Redis as kombu's Redis transport writes it, in one write with its events.

Celery's ``apply_async`` spends about three times a Redis round trip in Python on a plain
send (option merging, routing, ``saferepr``, signals, kombu's publish machinery). For a send
that needs none of what is skipped here, :func:`build` makes the same message with Celery's
own pieces (``router.route``, ``amqp.as_task_v2``; ``send_task_message``'s choice of exchange,
routing key and delivery mode), and :func:`publish` turns it into the bytes kombu's Redis
``_put`` would ``LPUSH`` (kombu's own serializer, ``prepare_message`` and body encoding), then
sends every ``LPUSH`` of a call and the jobs' lifecycle events in **one write**
(``synth_workers.wirelane``, the broker's Redis kept per app and process): one round trip,
the events first, so a job's ``queued`` event precedes anything a worker writes.
``tests/test_wire.py`` checks the bytes against kombu's, key by key.

:func:`build` returns ``None`` (the caller then uses Celery's own ``apply_async``) for a send
with any option beyond id, queue, priority and headers (canvas, ``link``, ``expires``,
stamps, a producer, ...), from inside a running task (Celery adds parent and root ids and
may inherit its priority), with ``task_publish``/``task_sent`` signal receivers connected or
``task_send_sent_event`` on (Celery calls them per send), under ``task_always_eager``, or
for a task or route that names an exchange, routing key, serializer or compression.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import celery
import redis
from celery import signals
from kombu.exceptions import OperationalError as KombuOperationalError

from synth_workers import wireevents, wirelane, wiresplice
from synth_workers.confview import setting
from synth_workers.lifecycle import JobEvent, Lifecycle, ListenerTimeout
from synth_workers.message import stored
from synth_workers.reprs import fast_saferepr

log = logging.getLogger(__name__)

#: ``apply_async`` options (left once ``publish.send`` took its own) the fast send builds.
FAST_OPTIONS = frozenset({"task_id", "queue", "priority", "headers"})
#: Options a route or the task's execution options may carry with a value (others: ``None``).
ROUTED = frozenset({"queue", "priority", "headers"})
#: A failure faster than this (a reset or refused socket) is retried once at once.
QUICK_FAILURE_SECONDS = 0.5


@dataclass(slots=True)
class Outgoing:
    """One message ready to go: Celery's protocol-2 parts and where kombu would put it."""

    job_id: str
    headers: dict[str, Any]
    properties: dict[str, Any]
    body: tuple[Any, Any, dict[str, Any]]
    queue: Any  # kombu Queue (declared once per connection, as kombu does)
    routing_key: str
    priority: int
    delivery_mode: Any
    serializer: str
    ignore_result: bool
    #: The message this one was copied from by ``synth_workers.wiremany.sibling`` (the same
    #: objects but for its ids, argument reprs, group index and body), ``None`` for one
    #: built whole: siblings' texts are made from one encoding (``synth_workers.wiresplice``).
    family: Outgoing | None = None

    def stored(self) -> dict[str, Any]:
        """The ledger's form of the message (``synth_workers.message.stored``)."""
        return stored(self.headers, self.body, self.properties)


_origin: list[str] = []


def stored_texts(outgoing: Sequence[Outgoing], encode: Callable[[Any], str]) -> list[str]:
    """``encode(out.stored())`` of each message; a family's siblings (``Outgoing.family``)
    from one encoding of its first (``synth_workers.wiresplice``), as the same text."""
    heads = {id(out.family) for out in outgoing if out.family is not None}
    families: dict[int, tuple[wiresplice.Template, Outgoing] | None] = {}
    texts: list[str] = []
    for out in outgoing:
        head = out.family if out.family is not None else out
        if id(head) in heads:
            if id(head) not in families:
                families[id(head)] = _stored_family(out, encode)
            family = families[id(head)]
            text = None if family is None else _stored_sibling(*family, out)
            if text is not None:
                texts.append(text)
                continue
        texts.append(encode(out.stored()))
    return texts


#: What differs between the stored forms of siblings: header names, then property names.
_STORED_VARYING = (("id", "root_id", "argsrepr", "kwargsrepr", "group_index"), ("correlation_id",))


def _stored_family(
    out: Outgoing, encode: Callable[[Any], str]
) -> tuple[wiresplice.Template, Outgoing] | None:
    model = out.stored()
    names = []
    for part, varying in zip(("headers", "properties"), _STORED_VARYING, strict=True):
        for name in varying:
            if model[part].get(name) is not None:
                model[part][name] = wiresplice.mark(name)
                names.append(name)
    made = wiresplice.template(model, names, encode)
    return None if made is None else (made, out)


def _stored_sibling(template: wiresplice.Template, first: Outgoing, out: Outgoing) -> str | None:
    """``out``'s stored text from its family's template; ``None``: not like its first."""
    headers, properties, model = out.headers, out.properties, first.headers
    if headers.keys() != model.keys() or properties.get("reply_to") != first.properties.get(
        "reply_to"
    ):
        return None
    values: dict[str, Any] = {}
    for name in _STORED_VARYING[0]:
        value = headers.get(name)
        if (value is None) is not (model.get(name) is None):
            return None
        values[name] = value
    correlation = properties.get("correlation_id")
    if ("correlation_id" in properties) is not ("correlation_id" in first.properties) or (
        correlation is None
    ) is not (first.properties.get("correlation_id") is None):
        return None
    values["correlation_id"] = correlation
    try:
        return template.fill(values)
    except TypeError:
        return None


def _forget_origin() -> None:
    _origin.clear()


os.register_at_fork(after_in_child=_forget_origin)


def _anon_nodename() -> str:
    """Celery's ``anon_nodename()`` (``gen<pid>@<host>``), computed once per process."""
    if not _origin:
        _origin.append(f"gen{os.getpid()}@{socket.gethostname()}")
    return _origin[0]


def _signals_connected() -> bool:
    return bool(
        signals.before_task_publish.receivers
        or signals.after_task_publish.receivers
        or signals.task_sent.receivers
    )


def eligible(task: Any, options: dict[str, Any]) -> bool:
    """Whether :func:`build` can make this send's message (else Celery's path does)."""
    app = task.app
    conf = app.conf
    return not (
        options.keys() - FAST_OPTIONS
        or setting(conf, "task_always_eager")
        or setting(conf, "task_send_sent_event")
        or _signals_connected()
        or task.__v2_compat__
        or type(task).shadow_name is not celery.Task.shadow_name
        or app.current_worker_task is not None
    )


def build(
    task: Any,
    args: Any,
    kwargs: Any,
    options: dict[str, Any],
    group: tuple[str, int] | None = None,
) -> Outgoing | None:
    """The message Celery's ``apply_async(args, kwargs, **options)`` would publish, or
    ``None`` when this send is not one :func:`eligible` allows (see the module docstring).
    ``options`` is not changed. ``group``: ``(group id, index)`` of a member of a group
    applied at the top level (what Celery's ``group`` adds to each member's send:
    ``synth_workers.groups``)."""
    if not eligible(task, options):
        return None
    app = task.app
    if task.soft_time_limit and task.time_limit and task.soft_time_limit > task.time_limit:
        return None  # Celery raises its own ValueError
    if task.typing:  # Celery's argument check, as apply_async makes it
        header = getattr(task, "__header__", None)
        if header is not None:
            header(*(args or ()), **(kwargs or {}))
    # Task.apply_async: the task's execution options under the call's own
    merged = dict(task._get_exec_options(), **options)
    merged.setdefault("ignore_result", task.ignore_result)
    time_limit = merged.pop("time_limit", None)
    soft_time_limit = merged.pop("soft_time_limit", None)
    if merged.pop("expires", None) is not None:
        return None
    ignore_result = merged.pop("ignore_result", None)
    task_id = merged.pop("task_id", None)
    if not task_id:
        return None
    routed = app.amqp.router.route(merged, task.name, args, kwargs, task)
    conf = app.conf
    serializer = routed.pop("serializer", None) or setting(conf, "task_serializer")
    if serializer != "json" or setting(conf, "task_compression"):
        return None
    if any(v is not None for k, v in routed.items() if k not in ROUTED):
        return None  # exchange, routing key, delivery mode, compression, ...: Celery's path
    queue = routed.get("queue")
    exchange = getattr(queue, "exchange", None)
    if queue is None or exchange is None or (exchange.type or "direct") != "direct":
        return None
    args = args or ()
    kwargs = kwargs or {}
    amqp = app.amqp
    maxlevels = setting(conf, "task_repr_maxlevels")
    headers, properties, body, _sent = amqp.as_task_v2(
        task_id,
        task.name,
        args,
        kwargs,
        reply_to=app.thread_oid,
        time_limit=time_limit,
        soft_time_limit=soft_time_limit,
        origin=_anon_nodename(),
        ignore_result=ignore_result,
        group_id=group[0] if group else None,
        group_index=group[1] if group else None,
        argsrepr=fast_saferepr(args, amqp.argsrepr_maxsize, maxlevels),
        kwargsrepr=fast_saferepr(kwargs, amqp.kwargsrepr_maxsize, maxlevels),
    )
    extra = routed.get("headers")
    if extra:
        headers.update(extra)
    priority = routed.get("priority")
    return Outgoing(
        job_id=task_id,
        headers=headers,
        properties=properties,
        body=body,
        queue=queue,
        routing_key=queue.name,
        priority=priority if priority is not None else 0,
        delivery_mode=exchange.delivery_mode or setting(conf, "task_default_delivery_mode"),
        serializer=serializer,
        ignore_result=bool(ignore_result),
    )


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a timeout."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (redis.TimeoutError, TimeoutError, ListenerTimeout)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def quick_failure(exc: BaseException, since: float) -> bool:
    """Whether ``exc``, raised by a step begun at ``since`` (``time.monotonic()``), is a
    failure worth one immediate retry: not a timeout, and within
    :data:`QUICK_FAILURE_SECONDS` (a socket Redis reset or closed fails before any wait)."""
    return not timed_out(exc) and time.monotonic() - since <= QUICK_FAILURE_SECONDS


def publish(
    app: Any, outgoing: Sequence[Outgoing], lifecycle: Lifecycle, events: Sequence[JobEvent]
) -> None:
    """Send ``events`` (to the events writer) and ``outgoing`` (to their queues) in one Redis
    write on the broker's connection (``synth_workers.wirelane``); retried once at once when
    it failed fast with a connection error. Raises what Redis raised (the caller decides what
    a failure means)."""
    publish_started(app, outgoing, lifecycle, events)()


def publish_started(
    app: Any, outgoing: Sequence[Outgoing], lifecycle: Lifecycle, events: Sequence[JobEvent]
) -> Callable[[], None]:
    """:func:`publish`, in two halves: write the commands now and return a function that
    reads Redis's replies (and raises what :func:`publish` raises), so the caller can work
    while Redis runs them (a bulk send builds its next chunk). Call the function once, also
    when something failed in between: until then the connection is held."""
    started = time.monotonic()
    try:
        finish = _start(app, outgoing, lifecycle, events)
    except (redis.ConnectionError, OSError, KombuOperationalError) as exc:
        if not quick_failure(exc, started):
            raise
        _start(app, outgoing, lifecycle, events, told=True)()
        return _nothing

    def finished() -> None:
        reading = time.monotonic()
        try:
            finish()
        except (redis.ConnectionError, OSError, KombuOperationalError) as exc:
            if not quick_failure(exc, reading):
                raise
            _start(app, outgoing, lifecycle, events, told=True)()

    return finished


def _nothing() -> None:
    return None


def _start(
    app: Any,
    outgoing: Sequence[Outgoing],
    lifecycle: Lifecycle,
    events: Sequence[JobEvent],
    told: bool = False,
) -> Callable[[], None]:
    """One publish: write it and return what reads the replies (kombu's path: all done)."""
    way = wirelane.lane(app)
    raws = way.raws(outgoing) if way is not None else None
    if way is None or raws is None:  # not kombu's Redis channel: kombu publishes
        with app.producer_or_acquire(None) as producer:
            for event in () if told else events:
                lifecycle.emit(event, raise_timeouts=True)
            for out in outgoing:
                _kombu_publish(producer, out)
        return _nothing
    commands: list[wirelane.Command] = []
    staged = wireevents.tell(lifecycle, [] if told else events, commands)
    by_key: dict[str, list[str]] = {}
    for key, text in raws:
        by_key.setdefault(key, []).append(text)
    for key, texts in by_key.items():
        commands.append(("LPUSH", key, *texts))  # in order: the first is taken first
    try:
        sent = way.send(commands)
    except BaseException:
        for listener, _index in staged:
            wireevents.unstage(listener, events)
        raise

    def finish() -> None:
        try:
            replies = sent.replies()
        except BaseException:
            for listener, _index in staged:
                wireevents.unstage(listener, events)
            raise
        _answered(staged, replies, events)

    return finish


def _answered(
    staged: Sequence[tuple[Any, int]], replies: Sequence[Any], events: Sequence[JobEvent]
) -> None:
    """The events writer's replies to its archive; an ``LPUSH`` Redis refused raised."""
    for listener, index in staged:
        if isinstance(replies[index], redis.exceptions.NoScriptError):
            wireevents.forget(listener.writer)
            for event in events:  # Redis lost the script: the listener loads it and writes
                listener(event)
        elif isinstance(replies[index], Exception):
            log.error("lifecycle listener %r failed: %r", listener, replies[index])
        else:
            listener.writer.written(replies[index])  # finished jobs' entries: archived
    ours = {index for _listener, index in staged}
    errors = [r for i, r in enumerate(replies) if isinstance(r, Exception) and i not in ours]
    if errors:  # an LPUSH refused (e.g. the key holds another type): not published
        raise errors[0]


def _kombu_publish(producer: Any, out: Outgoing) -> None:
    """Publish ``out`` through kombu's own ``Producer.publish`` (what Celery calls)."""
    with producer.connection._reraise_as_library_errors():
        producer.publish(
            out.body,
            exchange="",
            routing_key=out.routing_key,
            serializer=out.serializer,
            delivery_mode=out.delivery_mode,
            declare=[out.queue],
            headers=out.headers,
            priority=out.priority,
            retry=False,
            **out.properties,
        )
