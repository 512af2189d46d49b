"""The Celery message kept whole: what the ledger stores of a job's message, and how it is
captured and sent again.

**The message is the job.** A job's row keeps its Celery message (protocol 2) as sent::

    {"headers": {...}, "embed": {"callbacks", "errbacks", "chain", "chord"},
     "properties": {"correlation_id", "reply_to"}}

The body's args and kwargs are not repeated there: they are the row's ``args`` and
``payload`` columns (one copy of a payload per row, on the hot path too), and the body is
``[args, payload, embed]`` again when the message is sent.

so that chain, ``link``, ``link_error``, chord, group, root and parent ids, ``expires``,
time limits, shadow and stamps survive every re-publish (retry, delayed promotion, outbox,
reaper, reconciler, DLQ replay). A re-publish changes only the job id, ``retries``, ``eta``
(always ``None``: a job is published when due, its wait is kept in the ledger) and routing
(queue and priority, from the row).

Capture: :class:`CaptureProducer` stands in for kombu's producer while Celery's own
``send_task`` builds the message, so the message is exactly what Celery would have sent; the
platform then writes it to the ledger and publishes the captured call on a real producer.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from datetime import datetime
from typing import Any

from synth_workers.correlation import HEADER as CORRELATION_HEADER

#: Celery's protocol-2 headers (``celery.app.amqp.AMQP.as_task_v2``).
PROTOCOL2_HEADERS = (
    "lang",
    "task",
    "id",
    "shadow",
    "eta",
    "expires",
    "group",
    "group_index",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
    "replaced_task_nesting",
    "stamped_headers",
    "stamps",
)
#: Headers beside Celery's that a job keeps when it is adopted from a message sent around
#: the platform: its request id (``synth_workers.correlation``) and its trace context
#: (W3C Trace Context, as OpenTelemetry's Celery instrumentation injects it).
TRACING_HEADERS = (CORRELATION_HEADER, "traceparent", "tracestate")
#: The body's third element (``embed``): the canvas.
EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")
#: Headers :func:`stored` leaves out when ``None`` (Celery's own).
_OMITTED = frozenset(PROTOCOL2_HEADERS)
#: Message properties that belong to the job (the rest is per delivery or routing).
KEPT_PROPERTIES = ("correlation_id", "reply_to")


class _NoConnection:
    """What Celery's ``send_task`` asks of a producer's connection while capturing."""

    def _reraise_as_library_errors(self) -> AbstractContextManager[None]:
        return nullcontext()


class CaptureProducer:
    """A stand-in kombu producer: records the first ``publish()`` (the task message Celery
    built and routed) instead of sending it. Only the first: a ``task-sent`` event that
    Celery would publish on the same producer is not the job's message."""

    serializer: str | None = None
    connection = _NoConnection()

    def __init__(self) -> None:
        self.body: Any = None
        self.publish_kwargs: dict[str, Any] | None = None

    def publish(self, body: Any, **kwargs: Any) -> None:
        if self.publish_kwargs is None:
            self.body = body
            self.publish_kwargs = kwargs

    @property
    def captured(self) -> bool:
        return self.publish_kwargs is not None

    def queue(self) -> str | None:
        """The queue Celery routed the message to (the Redis transport's routing key)."""
        routing_key = (self.publish_kwargs or {}).get("routing_key")
        return str(routing_key) if routing_key else None

    def message(self) -> dict[str, Any]:
        """The captured message as the ledger stores it."""
        kwargs = self.publish_kwargs or {}
        return stored(kwargs.get("headers") or {}, self.body, kwargs)


def stored(headers: dict[str, Any], body: Any, properties: dict[str, Any]) -> dict[str, Any]:
    """The ledger's form of a protocol-2 message: headers, the body's ``embed`` (its args
    and kwargs are the row's own columns) and the job's own properties.

    Celery's own headers and canvas keys whose value is ``None`` are left out
    (:func:`for_publish` puts them back): a no-op job's message is about half ``null``s, and
    the row is copied whole by each of its updates (claim, completion)."""
    return {
        "headers": {k: v for k, v in headers.items() if v is not None or k not in _OMITTED},
        "embed": {k: v for k, v in (body[2] or {}).items() if v is not None},
        "properties": {k: properties[k] for k in KEPT_PROPERTIES if k in properties},
    }


def from_request(request: Any) -> dict[str, Any]:
    """The message a worker's request was built from (a job adopted from a producer that
    wrote no ledger row): its protocol-2 headers, stamps and canvas, as received."""
    headers: dict[str, Any] = {name: getattr(request, name, None) for name in PROTOCOL2_HEADERS}
    headers["task"] = getattr(request, "task", None) or headers["task"]
    for stamp in getattr(request, "stamped_headers", None) or ():
        if isinstance(stamp, str):
            headers[stamp] = getattr(request, stamp, None)
    for name in TRACING_HEADERS:
        value = getattr(request, name, None)
        if isinstance(value, str):
            headers[name] = value
    embed = {key: getattr(request, key, None) for key in EMBED_KEYS}
    properties = {
        "correlation_id": getattr(request, "correlation_id", None) or request.id,
        "reply_to": getattr(request, "reply_to", None) or "",
    }
    return {"headers": headers, "embed": embed, "properties": properties}


def from_kombu(message: Any) -> dict[str, Any] | None:
    """The stored form of a received kombu message; ``None`` when its body is not a
    protocol-2 ``[args, kwargs, embed]`` list."""
    body = message.decode()
    if not (isinstance(body, (list, tuple)) and len(body) == 3):
        return None
    headers = message.headers if isinstance(message.headers, dict) else {}
    return stored(headers, body, message.properties or {})


def for_publish(
    message: dict[str, Any],
    job_id: str,
    retries: int,
    args: list[Any] | None,
    kwargs: dict[str, Any],
    eta: datetime | None = None,
) -> tuple[dict[str, Any], dict[str, Any], tuple[Any, ...]]:
    """``message`` ready to send again for ``job_id``: (headers, properties, body) with the
    id, ``retries`` and ``eta`` (when the job was due; ``None``: now) replaced and the row's
    ``args`` and ``kwargs`` (its payload) as the body's; all else as sent."""
    headers = dict.fromkeys(PROTOCOL2_HEADERS)  # those stored() left out: None
    headers.update(message.get("headers") or {})
    headers["id"] = job_id
    headers["retries"] = retries
    headers["eta"] = None if eta is None else eta.isoformat()
    properties = dict(message.get("properties") or {})
    properties["correlation_id"] = job_id
    properties.setdefault("reply_to", "")
    return (
        headers,
        properties,
        (list(args or ()), kwargs, {**dict.fromkeys(EMBED_KEYS), **(message.get("embed") or {})}),
    )
