"""The broker's Redis as :func:`synth_workers.wire.publish` writes to it: one :class:`Lane`
per app and process, kept between sends, so a send costs its own bytes and one round trip,
not a producer's check-out and a redis-py pipeline's bookkeeping.

A lane holds:

* a redis-py client on the connection pool of the broker channel it was made from (kombu's
  ``Channel._create_client``: the same pool kombu's ``_put`` uses, Sentinel's included, and
  the global key prefix applied as kombu's prefixed client applies it);
* the queues it declared (kombu's ``maybe_declare``, once per queue and lane, as kombu does
  once per queue and connection);
* per shape of message (queue, priority, serializer, delivery mode and property names; at
  most :data:`MAX_SHAPES`) the list key and the envelope kombu's ``_put`` gives it: the
  first message of a shape goes through kombu's own ``prepare_message`` (:func:`_raw`),
  every later one takes that envelope with only its own body, headers, properties and
  delivery tag encoded.

It is made again in a forked child and when Celery replaced its producer pool (a fork, an
``app.close()``). :func:`lane` returns ``None`` when the broker is not kombu's Redis
transport; :meth:`Lane.raws` returns ``None`` for a message kombu must publish itself (a
queue declared with an expiry: kombu's ``_put`` sets it).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import hiredis
import redis
from kombu.utils import json as kombu_json

from synth_workers import jsonfast, wiresplice
from synth_workers.uuids import uuid4s

if TYPE_CHECKING:
    from synth_workers.wire import Outgoing

#: Shapes of message a lane keeps an envelope for (past this, a new shape's is made per send).
MAX_SHAPES = 1024
#: The envelope's properties every message of a shape shares.
_SHARED = ("delivery_mode", "delivery_info", "priority", "body_encoding")
#: A Redis command: its name, then its arguments.
Command = tuple[Any, ...]
#: ``(list key, envelope decoded)`` of one shape.
_Model = tuple[str, dict[str, Any]]

_ATTR = "_synth_lane"
_lock = threading.Lock()


def _new_lock() -> None:
    """A forked child's lock: another thread may have held the parent's at the fork."""
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock)


class Lane:
    """One app's way to the broker's Redis in this process (see the module docstring)."""

    def __init__(self, app: Any, pool: Any, client: Any, codec: Any) -> None:
        self.app, self.pool, self.pid = app, pool, os.getpid()
        self.client = client
        self._prefix = getattr(client, "_prefix_args", None)  # kombu's global key prefix
        self._codec = codec  # the channel's body encoding (base64 for kombu's Redis)
        self.declared: set[str] = set()
        self.models: dict[tuple[Any, ...], _Model] = {}

    def raws(self, outgoing: Sequence[Outgoing]) -> list[tuple[str, str]] | None:
        """``(list key, message text)`` of each message, as kombu's Redis ``_put`` would push
        it; ``None`` when one of them must go through kombu (see :func:`_raw`)."""
        models, declared = self.models, self.declared
        shapes = [_shape(out) for out in outgoing]
        new = [
            out
            for out, shape in zip(outgoing, shapes, strict=True)
            if shape not in models or out.queue.name not in declared
        ]
        if new:
            learned = self._learn(new)
            if learned is None:
                return None
            models = {**models, **learned}
        raws: list[tuple[str, str]] = []
        codec, dumps, prepare = self._codec, jsonfast.dumps, jsonfast.body
        tags = uuid4s(len(outgoing))  # kombu's delivery tags: a uuid4 each
        heads = {id(out.family) for out in outgoing if out.family is not None}
        families: dict[tuple[int, tuple[Any, ...]], _Family | None] = {}
        for out, shape, tag in zip(outgoing, shapes, tags, strict=True):
            key, envelope = models[shape]
            content_type, content_encoding, body = prepare(out.body, out.serializer)
            if codec is not None:
                body = codec.encode(body)
            head = out.family if out.family is not None else out
            if id(head) in heads:  # a sibling: its family's text with its own values
                family_key = (id(head), shape)
                if family_key not in families:
                    families[family_key] = _Family.of(out, envelope, content_type, content_encoding)
                family = families[family_key]
                text = None if family is None else family.text(out, body, tag)
                if text is not None:
                    raws.append((key, text))
                    continue
            properties = dict(out.properties)
            shared = envelope["properties"]
            for name in _SHARED:
                properties[name] = shared[name]
            properties["delivery_tag"] = tag
            message = {
                "body": body,
                "content-encoding": content_encoding,
                "content-type": content_type,
                "headers": dict(out.headers),
                "properties": properties,
            }
            raws.append((key, dumps(message)))
        return raws

    def _learn(self, outgoing: Sequence[Outgoing]) -> dict[tuple[Any, ...], _Model] | None:
        """Declare the queues of ``outgoing`` not declared yet and make the envelope of each
        shape not kept yet (kept while fewer than :data:`MAX_SHAPES` are), with a producer
        of the app's pool; ``None``: kombu must publish one of them."""
        learned: dict[tuple[Any, ...], _Model] = {}
        with self.app.producer_or_acquire(None) as producer:
            for out in outgoing:
                if out.queue.name not in self.declared:
                    producer.maybe_declare(out.queue)
                    self.declared.add(out.queue.name)
                shape = _shape(out)
                if shape in learned or shape in self.models:
                    continue
                raw = _raw(producer, out)
                if raw is None:
                    return None
                learned[shape] = (raw[0], kombu_json.loads(raw[1]))
                if len(self.models) < MAX_SHAPES:
                    self.models[shape] = learned[shape]
        return learned

    def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Send ``commands`` in one write and read every reply (see :meth:`send`)."""
        return self.send(commands).replies()

    def send(self, commands: Sequence[Command]) -> Sent:
        """Write ``commands`` at once on a connection of the pool, held until
        :meth:`Sent.replies` reads their replies."""
        if self._prefix is not None:
            commands = [self._prefix(command) for command in commands]
        pool = self.client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command(_packed(conn, commands))
        except BaseException:
            conn.disconnect()
            pool.release(conn)
            raise
        return Sent(pool, conn, len(commands))


def _packed(conn: Any, commands: Sequence[Command]) -> Any:
    """``conn.pack_commands(commands)``: hiredis's packer called at once when the connection
    encodes as it does (UTF-8, strict) and every argument is a ``str``, ``bytes``, ``int`` or
    ``float`` (redis-py's packer calls its encoder once per argument, in Python, first)."""
    encoder = getattr(conn, "encoder", None)
    if (
        encoder is not None
        and encoder.encoding.lower().replace("-", "") == "utf8"
        and encoder.encoding_errors == "strict"
    ):
        try:
            return [b"".join([hiredis.pack_command(tuple(command)) for command in commands])]
        except TypeError:  # another type (redis-py refuses a bool, accepts a memoryview)
            pass
    return conn.pack_commands(commands)


class Sent:
    """Commands written and not yet answered, on a connection held out of its pool."""

    __slots__ = ("_conn", "_count", "_pool")

    def __init__(self, pool: Any, conn: Any, count: int) -> None:
        self._pool, self._conn, self._count = pool, conn, count

    def replies(self) -> list[Any]:
        """Every reply, in order: a command Redis refused answers its
        :class:`redis.ResponseError`; a connection failure raises (the connection is
        dropped, not handed back with replies unread). The connection goes back to its pool."""
        conn = self._conn
        try:
            replies: list[Any] = []
            for _command in range(self._count):
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:
                    replies.append(exc)
        except BaseException:
            conn.disconnect()
            raise
        finally:
            self._pool.release(conn)
        return replies


#: Header values that differ between siblings (``synth_workers.wiremany.sibling``).
_VARYING_HEADERS = ("id", "root_id", "argsrepr", "kwargsrepr")


class _Family:
    """The envelope text of one family's messages in one send (``Outgoing.family``), made
    from one encoding of its first message (:mod:`synth_workers.wiresplice`)."""

    __slots__ = ("_grouped", "_keys", "_properties", "_template")

    def __init__(
        self,
        template: wiresplice.Template,
        keys: Any,
        properties: dict[str, Any],
        grouped: bool,
    ) -> None:
        self._template, self._keys = template, keys
        self._properties, self._grouped = properties, grouped

    @classmethod
    def of(
        cls, out: Outgoing, envelope: dict[str, Any], content_type: str, content_encoding: str
    ) -> _Family | None:
        """The family of ``out`` (its first message in this send); ``None``: encode each
        message whole."""
        mark = wiresplice.mark
        headers = dict(out.headers)
        if any(name not in headers for name in _VARYING_HEADERS):
            return None
        names = ["body", "tag", *_VARYING_HEADERS]
        for name in _VARYING_HEADERS:
            headers[name] = mark(name)
        grouped = headers.get("group_index") is not None
        if grouped:
            headers["group_index"] = mark("group_index")
            names.append("group_index")
        properties = dict(out.properties)
        shared = envelope["properties"]
        for name in _SHARED:
            properties[name] = shared[name]
        properties["delivery_tag"] = mark("tag")
        if "correlation_id" in properties:
            properties["correlation_id"] = mark("correlation_id")
            names.append("correlation_id")
        message = {
            "body": mark("body"),
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": headers,
            "properties": properties,
        }
        made = wiresplice.template(message, names, jsonfast.dumps)
        if made is None:
            return None
        same = {k: v for k, v in out.properties.items() if k != "correlation_id"}
        return cls(made, out.headers.keys(), same, grouped)

    def text(self, out: Outgoing, body: str, tag: str) -> str | None:
        """``out``'s envelope text; ``None`` when ``out`` is not like the family's first
        (other header names, properties or group membership: encode it whole)."""
        headers, properties = out.headers, out.properties
        if (
            headers.keys() != self._keys
            or (headers.get("group_index") is not None) is not self._grouped
            or len(properties) - ("correlation_id" in properties) != len(self._properties)
            or any(properties.get(k, self) != v for k, v in self._properties.items())
        ):
            return None
        values = {name: headers[name] for name in _VARYING_HEADERS}
        values["body"], values["tag"] = body, tag
        if self._grouped:
            values["group_index"] = headers["group_index"]
        if "correlation_id" in properties:
            values["correlation_id"] = properties["correlation_id"]
        try:
            return self._template.fill(values)
        except TypeError:  # a value of another type: encoded whole
            return None


def lane(app: Any) -> Lane | None:
    """``app``'s lane in this process (made the first time); ``None``: the broker is not
    kombu's Redis transport, and kombu publishes."""
    kept = app.__dict__.get(_ATTR)
    pool = app.__dict__.get("_pool")
    if kept is not None and kept[0] == os.getpid() and kept[1] is pool and pool is not None:
        return kept[2]  # type: ignore[no-any-return]
    with _lock:
        made: Lane | None = None
        with app.producer_or_acquire(None) as producer:
            channel = producer.channel
            if getattr(channel, "_q_for_pri", None) is not None:
                encoding = channel.body_encoding
                codec = None
                if encoding and encoding.lower() != "utf-8":
                    codec = channel.codecs.get(encoding)
                made = Lane(app, app.__dict__.get("_pool"), channel._create_client(), codec)
        setattr(app, _ATTR, (os.getpid(), app.__dict__.get("_pool"), made))
    return made


def _shape(out: Outgoing) -> tuple[Any, ...]:
    return (
        out.routing_key,
        out.priority,
        out.serializer,
        out.delivery_mode,
        tuple(out.properties),
    )


def _raw(producer: Any, out: Outgoing) -> tuple[str, str] | None:
    """``(list key, message text)`` as kombu's Redis ``_put`` would push ``out``; ``None``
    when this queue has an ``x-expires`` (a control reply queue declared on the same
    connection has one: only that queue counts): kombu's ``_put`` also sets its expiry."""
    channel = producer.channel
    if out.routing_key in (getattr(channel, "_expires", None) or ()):
        return None
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
    key = channel._q_for_pri(out.routing_key, channel._get_message_priority(message, False))
    return str(key), kombu_json.dumps(message)
