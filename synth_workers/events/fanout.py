"""One Redis reader for every SSE client of a server process.

Each client (:class:`Subscriber`) catches up from its own cursor with ordinary reads, then
joins the :class:`Fanout`, which follows every stream some client wants with one blocking
``XREAD`` on one connection and hands each new event to that stream's subscribers. A client
gets each event once (ids only go up per subscriber) and never misses one: it joins only
once its cursor has reached the reader's position on that stream. A new stream interrupts
the blocked read (``CLIENT UNBLOCK``) so its events flow at once. A subscriber that falls
``max_queue`` events behind is dropped (its stream ends; it reconnects with Last-Event-ID).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis

from synth_workers.events.stream import Event
from synth_workers.redisconn import async_redis_client

if TYPE_CHECKING:
    from synth_workers.settings import Settings

log = logging.getLogger(__name__)

CHUNK = 500


def id_key(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def frame(event: Event) -> bytes:
    """The event as one SSE message."""
    return f"id: {event.id}\ndata: {event.to_json()}\n\n".encode()


class Subscriber:
    """One client's view of one stream: a queue of (event, SSE message) after ``last``."""

    def __init__(self, key: str, cursor: str, max_queue: int) -> None:
        self.key = key
        self.last = id_key(cursor)
        self.max_queue = max_queue
        #: Events to send; ``None`` ends the stream (shutdown, overflow, disconnect).
        self.queue: asyncio.Queue[tuple[Event, bytes] | None] = asyncio.Queue()
        self.overflowed = False

    def push(self, event: Event, message: bytes | None = None) -> None:
        position = id_key(event.id)
        if position <= self.last or self.overflowed:
            return
        self.last = position
        if self.queue.qsize() >= self.max_queue:
            self.overflowed = True
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait((event, message or frame(event)))

    def close(self) -> None:
        self.queue.put_nowait(None)


class Fanout:
    """Follows the streams its subscribers want, on one connection, and fans events out."""

    def __init__(
        self,
        client: aioredis.Redis,
        url: str | Settings,
        block_ms: int = 1000,
        max_queue: int = 10_000,
    ) -> None:
        self.client = client  # catch-up reads and CLIENT UNBLOCK
        # its own connection (Sentinel included: synth_workers.redisconn)
        self.reader = async_redis_client(url, single_connection_client=True)
        self.block_ms = block_ms
        self.max_queue = max_queue
        self.positions: dict[str, str] = {}  # stream -> last id the reader has handed out
        self.subscribers: dict[str, set[Subscriber]] = {}
        self._reader_id: int | None = None
        self._reading = False
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="synth-events-fanout")

    async def close(self) -> None:
        for subs in self.subscribers.values():
            for sub in subs:
                sub.close()
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            # redis-py can swallow a cancellation that lands inside a command (it then
            # raises a connection error, which the loop retries): the flag and the wake-up
            # end the loop all the same.
            self._changed.set()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.reader.aclose()

    async def subscribe(self, key: str, cursor: str) -> Subscriber:
        """A subscriber to ``key`` that gets every event after ``cursor``, once."""
        sub = Subscriber(key, cursor, self.max_queue)
        while True:
            position = self.positions.get(key)
            if position is not None and id_key(position) <= sub.last:
                self.subscribers[key].add(sub)
                return sub
            after = "{}-{}".format(*sub.last)
            if position is None:  # nobody follows it yet: read until nothing is left
                reply: Any = await self.client.xread({key: after}, count=CHUNK)
                entries = [e for _k, es in reply or [] for e in es]
                if entries:
                    for entry_id, fields in entries:
                        sub.push(Event.from_entry(entry_id, fields))
                    continue
                if key not in self.positions:  # still nobody: follow it from here
                    self.positions[key] = after
                    self.subscribers[key] = {sub}
                    await self._wake()
                    return sub
                continue
            # the reader is ahead: read the gap (after, position] ourselves
            gap: Any = await self.client.xrange(key, min=f"({after}", max=position, count=CHUNK)
            for entry_id, fields in gap:
                sub.push(Event.from_entry(entry_id, fields))
            if not gap:  # trimmed away: nothing more to read below the reader's position
                sub.last = max(sub.last, id_key(position))

    def unsubscribe(self, sub: Subscriber) -> None:
        subs = self.subscribers.get(sub.key)
        if subs is None:
            return
        subs.discard(sub)
        if not subs:
            del self.subscribers[sub.key]
            self.positions.pop(sub.key, None)

    async def _wake(self) -> None:
        """Make the reader include a new stream now."""
        self._changed.set()
        if self._reading and self._reader_id is not None:
            try:
                await self.client.client_unblock(self._reader_id)
            except redis.RedisError as exc:
                log.debug("events: CLIENT UNBLOCK failed: %s", exc)

    async def _run(self) -> None:
        while not self._closing:
            if not self.positions:
                self._changed.clear()
                await self._changed.wait()
                continue
            try:
                if self._reader_id is None:
                    self._reader_id = int(await self.reader.client_id())
                self._changed.clear()
                streams: Any = dict(self.positions)
                self._reading = True
                try:
                    reply: Any = await self.reader.xread(streams, count=CHUNK, block=self.block_ms)
                finally:
                    self._reading = False
            except asyncio.CancelledError:
                raise
            except redis.RedisError as exc:
                log.warning("events: reading streams failed: %s; retrying", exc)
                self._reader_id = None
                await asyncio.sleep(1.0)
                continue
            for raw_key, entries in reply or []:
                key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
                subs = self.subscribers.get(key)
                for entry_id, fields in entries:
                    event = Event.from_entry(entry_id, fields)
                    if key in self.positions:
                        self.positions[key] = event.id
                    message = frame(event)  # encoded once for every subscriber
                    for sub in list(subs or ()):
                        sub.push(event, message)
