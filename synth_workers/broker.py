"""kombu's Redis transport, minus its ack emulation: the ledger already does that job.

Celery on Redis emulates acknowledgements: each delivered message is copied into an
``unacked`` hash (plus a sorted-set index) when a worker takes it, deleted again when the
worker acks, and pushed back to its queue by ``restore_visible`` once it has been out longer
than the visibility timeout. That costs two Redis round trips per job in the worker's main
process, and it is the source of Celery's known duplicates: a long or delayed job is handed
to a second worker after ``visibility_timeout`` whether or not the first is alive.

On this platform the ledger knows better (``synth_workers.ledger``): a job being run holds a
lease that its worker renews; the reaper requeues it when the lease expires, and the
reconciler re-publishes a job that is still *queued* in the ledger but no longer waiting in
Redis (a worker took the message and died before claiming it). So this transport keeps a
delivered message in worker memory only (enough for prefetch limits, for ``reject(requeue=
True)`` and for giving unstarted messages back at warm shutdown) and writes nothing to
Redis on delivery or ack. Selected by the app's ``broker_transport`` setting; the broker URL
stays ``redis://`` or ``rediss://``, and :class:`SentinelTransport` does the same on a master
found through Redis Sentinel (``sentinel://`` URLs, ``master_name``: see
``synth_workers.redisconn``).

It also screens every message it reads (``synth_workers.screening``): kombu parses a
message's envelope where it reads it, and a message that is not JSON, or not an envelope,
raised there and stopped the worker. Here the raw message is checked (size first, then the
envelope, body encoding and compression) and a refused one is handed on as a quarantine
envelope that the consumer dead-letters.

A purge (``celery purge``, ``app.control.purge()``: kombu's ``queue_purge``) reads and
deletes every priority list of the queue in one ``MULTI``, and hands the ids of the messages
it deleted to the hook named by the transport option ``synth_on_purge`` (a token from
:func:`register_purge_hook`: a callable the app sets, the ledger
cancels those jobs, so no reconciler publishes them again).
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Sequence
from typing import Any, cast

from celery import bootsteps
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

from synth_workers.batched import BATCH_OPTION
from synth_workers.batched.pull import Batch, pop_more
from synth_workers.screening import Limits, open_envelope


class _Unread(str):
    """A message as read from Redis, not parsed yet (parsed by :func:`open_envelope`)."""

    __slots__ = ()


def _unread(text: str) -> _Unread:
    return _Unread(text)


def _reading_raw(func: Callable[..., Any]) -> Callable[..., Any]:
    """kombu's own read function, with the ``loads`` it calls on each message read replaced
    by one that hands the raw text on (kombu has no hook for it; the rest of the function,
    connection handling and re-authentication included, stays kombu's)."""
    return types.FunctionType(
        func.__code__,
        {**func.__globals__, "loads": _unread},
        func.__name__,
        func.__defaults__,
        func.__closure__,
    )


_brpop_read_raw = _reading_raw(kombu_redis.Channel._brpop_read)  # type: ignore[attr-defined]
_get_raw = _reading_raw(kombu_redis.Channel._get)


def _batch_size(connection: Any) -> int:
    """Messages per fetch: the batched mode's ``synth_batch_size`` option, else 1."""
    options = getattr(connection, "transport_options", None) or {}
    size = options.get(BATCH_OPTION)
    return size if isinstance(size, int) and size > 1 else 1


def _fills(connection: Any) -> bool:
    """Whether a read fills the prefetch window (:data:`FILL_OPTION`, set by
    :class:`FillWindow`)."""
    options = getattr(connection, "transport_options", None) or {}
    return bool(options.get(FILL_OPTION))


def _limits(connection: Any) -> Limits:
    """The screening caps, from the broker transport options (``app.celery_config``)."""
    cached: Limits | None = getattr(connection, "_synth_limits", None)
    if cached is None:
        cached = Limits.from_options(getattr(connection, "transport_options", None))
        connection._synth_limits = cached
    return cached


#: Transport option: called with the ids of the messages a purge deleted.
ON_PURGE = "synth_on_purge"
#: The purge hooks of this process, by the token an app's transport options carry (a string:
#: the options must stay serializable, ``celery inspect stats`` sends them as JSON).
_purge_hooks: dict[str, Callable[[Sequence[str]], Any]] = {}


def register_purge_hook(hook: Callable[[Sequence[str]], Any]) -> str:
    """Keep ``hook`` for purges; returns the token to set as the ``synth_on_purge`` option."""
    token = f"purge-hook-{len(_purge_hooks) + 1}"
    _purge_hooks[token] = hook
    return token


def message_id(raw: bytes | str) -> str | None:
    """The task id in a raw message's headers (``None`` when it has none)."""
    try:
        message: Any = json.loads(raw)
    except ValueError:
        return None
    headers = message.get("headers") if isinstance(message, dict) else None
    job_id = headers.get("id") if isinstance(headers, dict) else None
    return str(job_id) if job_id else None


class QoS(kombu_redis.QoS):
    """Prefetch accounting in memory; no ``unacked`` hash, no visibility timeout."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        virtual.QoS.reject(self, delivery_tag, requeue=requeue)

    def restore_unacked(self, client: Any = None) -> Any:
        return virtual.QoS.restore_unacked(self)

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to restore: the ledger's reaper and reconciler take jobs back."""

    def free_slots(self) -> int | None:
        """Messages the prefetch window still has room for (``None``: no limit). The limit
        counts batches in the batched mode (N messages each)."""
        limit = self.prefetch_count
        if not limit:
            return None
        size = _batch_size(self.channel.connection.client)
        return limit * size - (len(self._delivered or ()) - len(self._dirty or ()))

    def can_consume(self) -> bool:
        free = self.free_slots()
        return free is None or free > 0


#: The most messages :meth:`Channel._fill_window` takes in one round trip.
FILL_MAX = 100
#: Transport option, set by :class:`FillWindow`: fill the prefetch window after each read.
FILL_OPTION = "synth_fill_window"


class FillWindow(bootsteps.StartStopStep):
    """Consumer step: a worker whose pool starts a job on other threads as it is handed over
    (threads, gevent, eventlet) fills its prefetch window in one round trip per read
    (:meth:`Channel._fill_window`). Not prefork, whose hand-over waits for the event loop,
    nor solo, which runs each job inside the read itself (the jobs taken together would
    hold the event loop, its timers included, until the last one ends). Runs after the
    Connection step, so again after each reconnect."""

    requires = ("celery.worker.consumer.connection:Connection",)

    def start(self, c: Any) -> None:
        from celery.concurrency.thread import TaskPool as ThreadPool

        options = c.connection.transport_options
        starts_elsewhere = isinstance(c.pool, ThreadPool) or getattr(c.pool, "is_green", False)
        if isinstance(options, dict) and starts_elsewhere:
            options[FILL_OPTION] = True


class Message(virtual.Message):
    """kombu's message; ``synth_refused`` is set when the transport refused it."""

    def __init__(self, payload: dict[str, Any], channel: Any = None, **kwargs: Any) -> None:
        self.synth_refused: dict[str, str] | None = payload.pop("synth_refused", None)
        #: The batched mode: the fetch this message came in (``synth_workers.batched``).
        self.synth_batch: Batch | None = payload.pop("synth_batch", None)
        super().__init__(payload, channel, **kwargs)


class Channel(kombu_redis.Channel):
    QoS = QoS
    Message = Message

    def _brpop_read(self, **options: Any) -> Any:
        size = _batch_size(self.connection.client)
        if size <= 1:
            # The default mode: deliver what BRPOP read, then fill the prefetch window's
            # other free slots in one more round trip (see :meth:`_fill_window`).
            got = _brpop_read_raw(self, **options)
            if _fills(self.connection.client):
                self._fill_window()
            return got
        # The batched mode: hold the message BRPOP read, take up to size - 1 more in one
        # round trip, then deliver them all as one batch.
        transport = cast("Transport", self.connection)
        held: list[tuple[Any, str]] = []
        transport._synth_hold = held
        try:
            got = _brpop_read_raw(self, **options)
        finally:
            transport._synth_hold = None
        held += self._pop_more(size - len(held))
        self._deliver_all(held, Batch(len(held)))
        return got

    def _fill_window(self) -> None:
        """Take as many messages as the prefetch window has free slots (at most
        :data:`FILL_MAX`) in one round trip, and deliver them one by one.

        kombu's loop takes one message per ``BRPOP`` and registers the next ``BRPOP``
        afterwards, so a worker whose window frees many slots at once (a threads pool whose
        group commit ends 50 jobs together) paid a round trip and a re-registration per
        message. The messages taken here are the ones the next ``BRPOP`` calls would have
        taken (the same lists, in the same priority order), and no more than the window
        holds, so priorities stay as strict as with ``BRPOP`` alone. The extra round trip
        is made after the first message was handed on; a pool that starts a job within the
        hand-over (threads, gevent, eventlet) has started it by then. Only such a worker sets
        :data:`FILL_OPTION` (:class:`FillWindow`): prefork writes to its pool processes from
        the event loop once this returns, so the round trip would delay the job's start."""
        free = cast("QoS", self.qos).free_slots()
        count = FILL_MAX if free is None else min(free, FILL_MAX)
        if count > 0:
            self._deliver_all(self._pop_more(count), None)

    def _pop_more(self, count: int) -> list[tuple[Any, str]]:
        """Up to ``count`` messages of the consumed queues, most urgent first, as
        (raw, queue) pairs (one round trip: :func:`pop_more`)."""
        if count <= 0:
            return []
        keys = [
            self._q_for_pri(queue, pri)  # type: ignore[attr-defined]
            for pri in self.priority_steps
            for queue in self.active_queues
        ]
        prefix = self.global_keyprefix or ""
        more = pop_more(self.client, [prefix + k for k in keys], count)
        return [(_unread(raw.decode()), key[len(prefix) :].rsplit(self.sep, 1)[0])
                for key, raw in more]  # fmt: skip

    def _deliver_all(self, held: list[tuple[Any, str]], batch: Batch | None) -> None:
        """Deliver messages taken together; should the consumer fail on one, the ones
        after it go back to the front of their lists."""
        transport = cast("Transport", self.connection)
        for i, (raw, queue) in enumerate(held):
            transport._synth_batch = batch
            try:
                transport._deliver(raw, queue)
            except BaseException:
                self._put_back([r for r, _ in held[i + 1 :]], [q for _, q in held[i + 1 :]])
                raise
            finally:
                transport._synth_batch = None

    def _put_back(self, raws: list[Any], queues: list[str]) -> None:
        """Messages of a batch not delivered (the consumer failed): back to the front of
        their lists, next to be taken (best effort: else the reconciler re-publishes them)."""
        if not raws:
            return
        with self.conn_or_acquire() as client, client.pipeline() as pipe:
            for raw, queue in reversed(list(zip(raws, queues, strict=True))):
                text = raw if isinstance(raw, str) else json.dumps(raw)
                key = self._q_for_pri(queue, self._priority_of(text))  # type: ignore[attr-defined]
                pipe.rpush(key, text)
            pipe.execute()

    def _priority_of(self, text: str) -> int:
        try:
            return int(self._get_message_priority(json.loads(text), reverse=False))
        except (ValueError, TypeError):
            return 0

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        raw = _get_raw(self, queue)
        return open_envelope(raw, queue, _limits(self.connection.client))

    def _purge(self, queue: str) -> int:
        """Delete every message of ``queue`` (all its priority lists) atomically, and hand
        their ids to the ``synth_on_purge`` hook; returns how many were deleted. Should the
        hook fail (Postgres down), the error is raised: the messages are gone, but their
        jobs stay queued in the ledger and the reconciler publishes them again."""
        lists = [self._q_for_pri(queue, pri) for pri in self.priority_steps]  # type: ignore[attr-defined]
        with self.conn_or_acquire() as client, client.pipeline(transaction=True) as pipe:
            for name in lists:
                pipe.lrange(name, 0, -1)
            for name in lists:
                pipe.delete(name)
            replies = pipe.execute()
        messages: list[Any] = [raw for items in replies[: len(lists)] for raw in items]
        token = (getattr(self.connection.client, "transport_options", None) or {}).get(ON_PURGE)
        hook = _purge_hooks.get(token) if isinstance(token, str) else None
        if hook is not None and messages:
            hook([i for i in map(message_id, messages) if i is not None])
        return len(messages)

    def _restore(self, message: Any, leftmost: bool = False) -> None:
        """Put a delivered, unstarted message back on its queue (from memory)."""
        delivery = message.delivery_info
        with self.conn_or_acquire() as client, client.pipeline() as pipe:
            self._do_restore_message(  # type: ignore[attr-defined]
                message._raw, delivery["exchange"], delivery["routing_key"], pipe, leftmost
            )
            pipe.execute()


class Transport(kombu_redis.Transport):
    Channel = Channel

    #: The batched mode (see ``Channel._brpop_read``): where a read's message is held, and
    #: the batch the message being delivered belongs to.
    _synth_hold: list[tuple[Any, str]] | None = None
    _synth_batch: Batch | None = None

    def _deliver(self, message: Any, queue: str | None) -> None:
        hold = self._synth_hold
        if hold is not None:
            hold.append((message, queue or "?"))
            return
        if isinstance(message, _Unread):
            message = open_envelope(message, queue or "?", _limits(self.client))
        batch = self._synth_batch
        if batch is not None and isinstance(message, dict):
            batch.delivered += 1
            message["synth_batch"] = batch
        super()._deliver(message, queue)


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """:class:`Channel` on a master found through Redis Sentinel (kombu's own Sentinel
    channel supplies the pool: each new connection asks the sentinels where the master is,
    so after a failover the consumer's reconnect lands on the new one)."""


class SentinelTransport(Transport):
    """:class:`Transport` for ``sentinel://`` URLs (``master_name`` transport option)."""

    Channel = SentinelChannel
    default_port = kombu_redis.SentinelTransport.default_port
