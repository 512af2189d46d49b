"""The fast send: a job's Celery message built as Celery's ``send_task`` builds it, and
written to Redis as kombu's Redis transport writes it, in one pipeline with its events.

Celery's ``apply_async`` spends about three times a Redis round trip in Python on a plain
send (option merging, routing, ``saferepr``, signals, kombu's publish machinery). For a send
that needs none of what is skipped here, :func:`build` makes the same message with Celery's
own pieces (``router.route``, ``amqp.as_task_v2``; ``send_task_message``'s choice of exchange,
routing key and delivery mode), and :func:`publish` turns it into the bytes kombu's Redis
``_put`` would ``LPUSH`` (kombu's own serializer, ``prepare_message`` and body encoding), then
sends every ``LPUSH`` of a call and the jobs' lifecycle events in **one pipeline**: one
round trip, the events first, so a job's ``queued`` event precedes anything a worker writes.
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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import celery
import redis
from celery import signals
from kombu.exceptions import OperationalError as KombuOperationalError
from kombu.utils import json as kombu_json

from synth_workers import wireevents
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

    def stored(self) -> dict[str, Any]:
        """The ledger's form of the message (``synth_workers.message.stored``)."""
        return stored(self.headers, self.body, self.properties)


_origin: list[str] = []


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
        or conf.task_always_eager
        or conf.task_send_sent_event
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
    serializer = routed.pop("serializer", None) or app.conf.task_serializer
    if serializer != "json" or app.conf.task_compression:
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
    maxlevels = app.conf.task_repr_maxlevels
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
        delivery_mode=exchange.delivery_mode or app.conf.task_default_delivery_mode,
        serializer=serializer,
        ignore_result=bool(ignore_result),
    )


def _raw(producer: Any, out: Outgoing) -> tuple[str, str] | None:
    """``(list key, message text)`` as kombu's Redis ``_put`` would push ``out``; ``None``
    when the channel is not kombu's Redis channel or this queue has an ``x-expires`` (a
    control reply queue declared on the same connection has one: only that queue counts)."""
    channel = producer.channel
    q_for_pri = getattr(channel, "_q_for_pri", None)
    if q_for_pri is None or out.routing_key in (getattr(channel, "_expires", None) or ()):
        return None  # kombu's _put also sets the queue's expiry: kombu publishes it
    headers = dict(out.headers)
    properties = dict(out.properties)
    # kombu Producer.publish / _publish
    _exchange, properties["delivery_mode"] = producer._delivery_details(
        producer.exchange, out.delivery_mode
    )
    body, content_type, content_encoding = producer._prepare(
        out.body, out.serializer, None, None, None, headers
    )
    message = channel.prepare_message(
        body, out.priority, content_type, content_encoding, headers, properties
    )
    channel._inplace_augment_message(message, "", out.routing_key)
    key = q_for_pri(out.routing_key, channel._get_message_priority(message, reverse=False))
    return str(key), kombu_json.dumps(message)


def _raws(producer: Any, outgoing: Sequence[Outgoing]) -> list[tuple[str, str] | None]:
    """:func:`_raw` of each message; one like the one before it (the same queue, priority,
    serializer, delivery mode and property names: a bulk call's, a group's) takes that one's
    list key and envelope, only its own body, headers and properties encoded."""
    raws: list[tuple[str, str] | None] = []
    model: tuple[Outgoing, str, str] | None = None
    envelope: dict[str, Any] | None = None  # the model's, decoded once a message is alike
    channel = producer.channel
    for out in outgoing:
        if model is not None and _alike(model[0], out):
            _first, key, text = model
            if envelope is None:
                envelope = kombu_json.loads(text)
            headers = dict(out.headers)
            body, _type, _encoding = producer._prepare(
                out.body, out.serializer, None, None, None, headers
            )
            shared = envelope["properties"]
            properties = dict(out.properties)
            for name in ("delivery_mode", "delivery_info", "priority", "body_encoding"):
                properties[name] = shared[name]
            properties["delivery_tag"] = channel._next_delivery_tag()
            message = {
                "body": channel.encode_body(body, channel.body_encoding)[0],
                "content-encoding": envelope["content-encoding"],
                "content-type": envelope["content-type"],
                "headers": headers,
                "properties": properties,
            }
            raws.append((key, kombu_json.dumps(message)))
            continue
        raw = _raw(producer, out)
        raws.append(raw)
        if raw is not None:
            model, envelope = (out, raw[0], raw[1]), None
    return raws


def _alike(first: Outgoing, out: Outgoing) -> bool:
    return (
        out.routing_key == first.routing_key
        and out.priority == first.priority
        and out.serializer == first.serializer
        and out.delivery_mode == first.delivery_mode
        and out.properties.keys() == first.properties.keys()
    )


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a timeout."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (redis.TimeoutError, TimeoutError, ListenerTimeout)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def publish(
    app: Any, outgoing: Sequence[Outgoing], lifecycle: Lifecycle, events: Sequence[JobEvent]
) -> None:
    """Send ``events`` (to the events writer) and ``outgoing`` (to their queues) in one Redis
    pipeline on the broker's connection; retried once at once when it failed fast with a
    connection error. Raises what Redis raised (the caller decides what a failure means)."""
    started = time.monotonic()
    try:
        _publish_once(app, outgoing, lifecycle, events)
    except (redis.ConnectionError, OSError, KombuOperationalError) as exc:
        if timed_out(exc) or time.monotonic() - started > QUICK_FAILURE_SECONDS:
            raise
        _publish_once(app, outgoing, lifecycle, events, told=True)


def _publish_once(
    app: Any,
    outgoing: Sequence[Outgoing],
    lifecycle: Lifecycle,
    events: Sequence[JobEvent],
    told: bool = False,
) -> None:
    with app.producer_or_acquire(None) as producer:
        channel = producer.channel
        # kombu binds a copy of the queue and its exchange before it looks at its cache of
        # declared entities: this looks first (a new channel, a reconnect, declares again)
        declared: set[str] = channel.__dict__.setdefault("_synth_declared", set())
        for queue in {id(out.queue): out.queue for out in outgoing}.values():
            if queue.name not in declared:
                producer.maybe_declare(queue)
                declared.add(queue.name)
        raws = _raws(producer, outgoing)
        if any(r is None for r in raws):  # not kombu's Redis channel: kombu publishes
            for event in () if told else events:
                lifecycle.emit(event, raise_timeouts=True)
            for out in outgoing:
                _kombu_publish(producer, out)
            return
        # kombu's _put makes a client (on the channel's pool) per message; one per channel
        client = getattr(channel, "_synth_client", None)
        if client is None:
            client = channel._synth_client = channel._create_client()
        pipe = client.pipeline(transaction=False)
        staged = wireevents.tell(lifecycle, [] if told else events, pipe)
        by_key: dict[str, list[str]] = {}
        for raw in raws:
            assert raw is not None
            by_key.setdefault(raw[0], []).append(raw[1])
        for key, texts in by_key.items():
            pipe.lpush(key, *texts)  # in order: the first is taken first
        try:
            replies = pipe.execute(raise_on_error=False)
        except BaseException:
            for listener, _index in staged:
                wireevents.unstage(listener, events)
            raise
        finally:
            pipe.reset()
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
