"""What a worker checks of a message before Celery sees it, so that no message can stop it.

Every message a worker takes ends in one of two ways: it runs, or it is dead-lettered in the
ledger (failure class ``rejected_message``) with the layer that refused it as its reason.
Nothing a message holds makes a worker exit, stall or grow without bound, and a refused
message is never put back on a queue.

==============  ===========================================================================
reason          refused when
==============  ===========================================================================
``size``        the raw message is over ``SYNTH_MAX_MESSAGE_BYTES`` (checked before decoding)
``envelope``    kombu's envelope is not a JSON object with ``properties``, a field of it has
                the wrong type, or the body is not valid base64
``compression`` the message is compressed while ``SYNTH_ALLOW_COMPRESSION`` is off, with an
                unknown method, or it decompresses past ``SYNTH_MAX_PAYLOAD_BYTES`` (as a
                stream: the whole thing is never inflated first)
``content_type``not JSON (pickle, YAML, msgpack ... are never decoded)
``body``        the body is not JSON, or not Celery's ``[args, kwargs, embed]``
``header``      a header Celery reads has the wrong type or value: ``id`` not a UUID, no
                ``task`` (protocol 1), ``timelimit``, ``eta``, ``expires``, ``retries``,
                ``priority`` ...; an ``eta`` beyond ``SYNTH_MAX_DELAY_SECONDS``
``unknown_task``no task of that name is registered on the worker
``expired``     its ``expires`` has passed (a job with a ledger row ends ``cancelled``)
``protocol``    Celery could not build a request from it for any other reason
==============  ===========================================================================

A payload that does not bind to its task's signature or model is found when the job runs,
and is dead at once with failure class ``invalid_payload`` (``synth_workers.runner``).

Two stages: :func:`open_envelope` in the transport (``synth_workers.broker``), on the raw
bytes, and :func:`check_task_message` in the consumer (``synth_workers.consumer``), on the
kombu message. A message refused by the transport reaches the consumer as a *quarantine*
envelope that carries the refusal and the first bytes of the original, never the original.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import lzma
import math
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from synth_workers import jsonfast

REASONS = (
    "size",
    "envelope",
    "compression",
    "content_type",
    "body",
    "header",
    "unknown_task",
    "expired",
    "protocol",
)

#: kombu's Redis transport: priority steps 0-9 (``app.celery_config``'s ``priority_steps``).
TRANSPORT_STEPS = 10

#: The most of a refused message that is kept (its first bytes, before any decoding).
STORED_BYTES = 4096

#: Compression names kombu uses (and their aliases), each with a streaming decompressor.
_DECOMPRESSORS: dict[str, Callable[[], Any]] = {
    "application/x-gzip": lambda: zlib.decompressobj(47),  # zlib or gzip framing
    "gzip": lambda: zlib.decompressobj(47),
    "zlib": lambda: zlib.decompressobj(47),
    "application/x-bz2": bz2.BZ2Decompressor,
    "bzip2": bz2.BZ2Decompressor,
    "bz2": bz2.BZ2Decompressor,
    "application/x-lzma": lzma.LZMADecompressor,
    "lzma": lzma.LZMADecompressor,
    "xz": lzma.LZMADecompressor,
}

_OPTIONAL_STR_HEADERS = ("shadow", "root_id", "parent_id", "group", "argsrepr", "kwargsrepr",
                         "origin", "replaced_task_nesting", "lang")  # fmt: skip
_EMBED_LISTS = ("callbacks", "errbacks", "chain")


@dataclass(frozen=True)
class Limits:
    """The caps a worker applies to every message (from the settings)."""

    max_message_bytes: int = 1024 * 1024
    max_payload_bytes: int = 256 * 1024
    allow_compression: bool = False
    max_delay_seconds: float = 365 * 24 * 3600.0

    #: Keys of the broker transport options that carry these (see ``app.celery_config``).
    OPTIONS: ClassVar[dict[str, str]] = {
        "synth_max_message_bytes": "max_message_bytes",
        "synth_max_payload_bytes": "max_payload_bytes",
        "synth_allow_compression": "allow_compression",
        "synth_max_delay_seconds": "max_delay_seconds",
    }

    @classmethod
    def from_settings(cls, settings: Any) -> Limits:
        """The caps set by a :class:`~synth_workers.settings.Settings`."""
        return cls(
            max_message_bytes=settings.max_message_bytes,
            max_payload_bytes=settings.max_payload_bytes,
            allow_compression=settings.allow_compression,
            max_delay_seconds=settings.max_delay_seconds,
        )

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> Limits:
        options = options or {}
        return cls(**{field: options[k] for k, field in cls.OPTIONS.items() if k in options})

    def as_options(self) -> dict[str, Any]:
        return {key: getattr(self, field) for key, field in self.OPTIONS.items()}


class Refused(Exception):  # noqa: N818 - an outcome, raised inside this module only
    """A message refused at one layer; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail[:1000]
        #: The message's ``id`` and ``task`` headers, when it got as far as having them.
        self.headers: dict[str, str] = {}


def stored_text(raw: bytes | str) -> str:
    """What the ledger keeps of a refused message: its first bytes, cut before decoding,
    as text Postgres ``jsonb`` accepts (no NUL, no lone surrogate)."""
    if isinstance(raw, str):
        raw = raw[:STORED_BYTES].encode("utf-8", "surrogateescape")
    head = raw[:STORED_BYTES].decode("utf-8", "backslashreplace")
    return head.replace("\x00", "\\x00")


# --- stage 1: the transport -----------------------------------------------------------------


def open_envelope(raw: bytes | str, queue: str, limits: Limits) -> dict[str, Any]:
    """The kombu envelope of a message read from ``queue``, checked and rebuilt from its
    known fields only; a refused one comes back as a :func:`quarantine` envelope."""
    try:
        return _checked_envelope(raw, queue, limits)
    except Refused as refused:
        return quarantine(raw, queue, refused.reason, refused.detail, refused.headers)


def quarantine(
    raw: bytes | str, queue: str, reason: str, detail: str, headers: Mapping[str, str] = {}
) -> dict[str, Any]:
    """An envelope that carries a refusal to the consumer (and nothing it could run);
    ``headers``: the refused message's ``id`` and ``task``, where known."""
    return {
        "body": "",
        "content-type": "application/json",
        "content-encoding": "utf-8",
        "headers": {},
        "properties": {
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": queue},
            "body_encoding": "base64",
            "priority": 0,
        },
        "synth_refused": {
            "reason": reason,
            "detail": detail,
            "raw": stored_text(raw),
            **{k: v for k, v in headers.items() if k in ("id", "task")},
        },
    }


def _checked_envelope(raw: bytes | str, queue: str, limits: Limits) -> dict[str, Any]:
    if len(raw) > limits.max_message_bytes:
        raise Refused(
            "size",
            f"message is {len(raw)} bytes, over the {limits.max_message_bytes}-byte cap "
            "(SYNTH_MAX_MESSAGE_BYTES)",
        )
    try:
        envelope = jsonfast.loads(raw)
    except Exception as exc:
        raise Refused("envelope", f"not JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(envelope, dict):
        raise Refused("envelope", f"a JSON {type(envelope).__name__}, not an object")
    properties = envelope.get("properties")
    if not isinstance(properties, dict):
        raise Refused("envelope", "no 'properties' object")
    headers = envelope.get("headers")
    if headers is None:
        headers = {}
    if not isinstance(headers, dict):
        raise Refused("envelope", "'headers' is not an object")
    try:
        return _checked_fields(envelope, properties, headers, queue, limits)
    except Refused as refused:
        refused.headers = {
            k: v[:500] for k in ("id", "task") if isinstance(v := headers.get(k), str)
        }
        raise


def _checked_fields(
    envelope: dict[str, Any],
    properties: dict[str, Any],
    headers: dict[str, Any],
    queue: str,
    limits: Limits,
) -> dict[str, Any]:
    content_type = envelope.get("content-type")
    content_encoding = envelope.get("content-encoding")
    for name, value in (("content-type", content_type), ("content-encoding", content_encoding)):
        if value is not None and not isinstance(value, str):
            raise Refused("envelope", f"'{name}' is not a string")
    encoding = properties.get("body_encoding")
    if encoding not in (None, "base64"):
        raise Refused("envelope", f"unknown body_encoding {encoding!r}")
    body = envelope.get("body")
    if body is None:
        body = ""
    if not isinstance(body, str):
        raise Refused("envelope", "'body' is not a string")
    info = properties.get("delivery_info")
    if not isinstance(info, dict):
        info = {}
    exchange = info.get("exchange")
    priority = properties.get("priority")
    if priority is not None and (
        isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 255
    ):
        raise Refused("header", f"priority must be an integer 0-255, got {priority!r}")
    compression = headers.get("compression")
    if compression is not None:
        data = _base64(body) if encoding == "base64" else body.encode("utf-8", "surrogateescape")
        body = base64.b64encode(_decompress(data, compression, limits)).decode()
        encoding = "base64"
        headers = {k: v for k, v in headers.items() if k != "compression"}
    elif encoding == "base64":
        _base64(body)
    return {
        "body": body,
        "content-type": content_type,
        "content-encoding": content_encoding,
        "headers": headers,
        "properties": {
            **{k: v for k, v in properties.items() if isinstance(k, str)},
            # Fresh per delivery: a tag chosen by the sender could collide with another
            # message's and upset the prefetch accounting.
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {
                "exchange": exchange if isinstance(exchange, str) else "",
                "routing_key": queue,
                # set by kombu when a rejected message is put back (Celery's
                # request.delivery_info['redelivered'])
                **({"redelivered": True} if info.get("redelivered") is True else {}),
            },
            "body_encoding": encoding,
            # kombu's Redis transport has ten priority steps (0-9): a larger value is the
            # last step, as kombu itself files it
            **({} if priority is None else {"priority": min(priority, TRANSPORT_STEPS - 1)}),
        },
    }


def _base64(body: str) -> bytes:
    try:
        return base64.b64decode(body.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise Refused("envelope", "body is not valid base64") from None


def _decompress(data: bytes, method: Any, limits: Limits) -> bytes:
    if not limits.allow_compression:
        raise Refused(
            "compression", f"compressed ({method!r}) while SYNTH_ALLOW_COMPRESSION is off"
        )
    make = _DECOMPRESSORS.get(method) if isinstance(method, str) else None
    if make is None:
        raise Refused("compression", f"unknown compression {method!r}")
    cap = limits.max_payload_bytes
    decompressor = make()
    try:
        out = decompressor.decompress(data, cap + 1)
    except Exception as exc:
        raise Refused("compression", f"does not decompress: {exc}") from None
    if len(out) > cap or not decompressor.eof:
        raise Refused(
            "compression",
            f"decompresses past the {cap}-byte cap (SYNTH_MAX_PAYLOAD_BYTES), or is truncated",
        )
    return bytes(out)


# --- stage 2: the consumer ------------------------------------------------------------------


@dataclass(frozen=True)
class TaskMessage:
    """What the consumer needs of a message that passed :func:`check_task_message`."""

    id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]
    eta: datetime | None
    expires: datetime | None


def check_task_message(message: Any, known: Mapping[str, Any], limits: Limits) -> TaskMessage:
    """Check a Celery protocol-2 task message; raise :class:`Refused` saying why not.

    ``known``: the worker's registered tasks. The body is decoded through the message
    itself (kombu caches it), so Celery does not decode it a second time.
    """
    headers = message.headers
    if not isinstance(headers, dict):
        raise Refused("header", "headers are not an object")
    task = headers.get("task")
    if not isinstance(task, str) or not task:
        raise Refused("header", "no 'task' header (only Celery's message protocol 2 is taken)")
    job_id = headers.get("id")
    try:
        if not isinstance(job_id, str):
            raise ValueError
        job_id = str(uuid.UUID(job_id))
    except ValueError:
        raise Refused("header", f"id must be a UUID, got {str(job_id)[:80]!r}") from None
    for name in _OPTIONAL_STR_HEADERS:
        value = headers.get(name)
        if value is not None and not isinstance(value, str | int):
            raise Refused("header", f"{name} must be a string")
    retries = headers.get("retries")
    if retries is not None and (
        isinstance(retries, bool) or not isinstance(retries, int) or retries < 0
    ):
        raise Refused("header", f"retries must be a non-negative integer, got {retries!r}")
    _check_timelimit(headers.get("timelimit"))
    eta = _moment(headers.get("eta"), "eta")
    expires = _moment(headers.get("expires"), "expires")
    if eta is not None:
        ahead = (eta - datetime.now(UTC)).total_seconds()
        if ahead > limits.max_delay_seconds:
            raise Refused(
                "header",
                f"eta {eta.isoformat()} is further ahead than {limits.max_delay_seconds:g}s "
                "(SYNTH_MAX_DELAY_SECONDS)",
            )
    content_type = message.content_type
    if content_type != "application/json":
        raise Refused("content_type", f"content type {content_type!r}; only JSON is accepted")
    if task not in known:
        raise Refused("unknown_task", f"no task {task[:200]!r} is registered on this worker")
    try:
        body = message.decode()
    except Exception as exc:
        raise Refused("body", f"not JSON: {type(exc).__name__}: {exc}") from None
    args, kwargs = _check_body(body)
    return TaskMessage(job_id, task, args, kwargs, eta, expires)


def _check_timelimit(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise Refused("header", f"timelimit must be [hard, soft], got {str(value)[:80]}")
    for limit in value:
        if limit is None:
            continue
        if (
            isinstance(limit, bool)
            or not isinstance(limit, int | float)
            or not math.isfinite(limit)
            or limit < 0
        ):
            raise Refused("header", f"timelimit values must be seconds or null, got {limit!r}")


def _moment(value: Any, name: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise Refused("header", f"{name} must be an ISO 8601 string, got {str(value)[:80]!r}")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise Refused("header", f"{name} is not an ISO 8601 time: {value[:80]!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _check_body(body: Any) -> tuple[list[Any], dict[str, Any]]:
    if not isinstance(body, list | tuple) or len(body) != 3:
        raise Refused("body", f"not Celery's [args, kwargs, embed] but a {type(body).__name__}")
    args, kwargs, embed = body
    if not isinstance(args, list | tuple):
        raise Refused("body", f"args must be a list, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise Refused("body", f"kwargs must be an object, got {type(kwargs).__name__}")
    if embed is not None:
        if not isinstance(embed, dict):
            raise Refused("body", f"embed must be an object, got {type(embed).__name__}")
        for name in _EMBED_LISTS:
            value = embed.get(name)
            if value is not None and (
                not isinstance(value, list) or not all(isinstance(s, dict) for s in value)
            ):
                raise Refused("body", f"embed[{name!r}] must be a list of signatures")
        chord = embed.get("chord")
        if chord is not None and not isinstance(chord, dict):
            raise Refused("body", "embed['chord'] must be a signature")
    return list(args), kwargs
