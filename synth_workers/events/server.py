"""The SSE server (``synth-workers events serve``): job events over HTTP, on Tornado.

``GET /events?job=ID`` streams one job's events (its whole history first, then live; the
stream ends after the job's final event), ``GET /events?user=ID`` one user's (new events;
``since=0`` for the history kept). Each event is one SSE message: ``id:`` (the event id,
monotonic over all jobs) and ``data:`` (the event as JSON: ``kind``, ``job_id``, ``task``,
``queue``, ``attempt``, ``user_id``, ``at``, ``data``). A client that reconnects with
``Last-Event-ID`` (browsers do) gets every event after that id, none twice; once the job has
ended and nothing is left to send, the answer is ``204 No Content`` (a browser's EventSource
then stops reconnecting). An idle stream carries a ``: heartbeat`` comment every
``SYNTH_EVENTS_HEARTBEAT`` seconds.

Authentication: a JWT signed with ``JWT_SECRET`` (HS256, a key of at least 32 bytes), whose
``sub`` is the user and whose ``exp`` lies at most ``SYNTH_EVENTS_TOKEN_MAX_TTL`` seconds
ahead, as ``Authorization: Bearer <JWT>`` or as the ``access_token`` query parameter (what a
browser's ``EventSource`` can send; RFC 6750 §2.3). Both at once: 400. Missing or invalid:
401. Another user's job or stream: 403. A user reads only their own jobs' events. The query
parameter's value never reaches a log line: it is taken out of the request's URI before
anything can log it. ``GET /health`` answers JSON from local state (no Redis round trip).

Browsers on other origins: ``CORS_ORIGINS`` (see :mod:`synth_workers.events.cors`).

A cursor (``Last-Event-ID`` or ``since``) that is not a stream id Redis accepts (``ms`` or
``ms-seq``, each an unsigned 64-bit integer) is a 400, checked before any Redis call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.iostream import StreamClosedError

from synth_workers.events.auth import (
    QUERY_PARAMETER,
    AuthenticationError,
    TokenRequestError,
    authenticate,
    secret_of,
    take_query_token,
)
from synth_workers.events.cors import CorsPolicy
from synth_workers.events.cursor import BAD_CURSOR, parse_cursor, refused_id
from synth_workers.events.fanout import Fanout, Subscriber, frame
from synth_workers.events.history import ledger_history
from synth_workers.events.shared import Handler, HealthHandler, JobLookup, State, ledger_lookup
from synth_workers.events.stream import Event, id_key, job_stream, user_stream
from synth_workers.events.subscription import holds_after
from synth_workers.ledger import Ledger
from synth_workers.redisconn import async_redis_client
from synth_workers.settings import Settings
from synth_workers.states import FINAL_KINDS, FINAL_STATES

log = logging.getLogger(__name__)

#: Browsers wait this long (ms) before reconnecting a dropped stream.
RETRY_MS = 2000


class EventsHandler(Handler):
    """``GET /events?job=ID`` / ``?user=ID``: server-sent events."""

    def initialize(self, state: State) -> None:
        super().initialize(state)
        self.closed = False
        self.query_tokens = take_query_token(self.request)

    def on_connection_close(self) -> None:
        self.closed = True
        subscriber = getattr(self, "subscriber", None)
        if subscriber is not None:
            subscriber.close()  # wake the handler now

    def _refuse(self, status: int, message: str) -> None:
        self.set_status(status)
        if status == 401:
            self.set_header("WWW-Authenticate", 'Bearer realm="synth-workers events"')
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps({"error": message}))

    async def get(self) -> None:
        state = self.state
        try:
            if len(self.query_tokens) > 1:
                raise TokenRequestError(f"{QUERY_PARAMETER} given more than once")
            user = authenticate(
                self.request.headers.get("Authorization"),
                state.secret,
                state.token_max_ttl,
                access_token=self.query_tokens[0] if self.query_tokens else None,
            )
        except TokenRequestError as exc:
            self._refuse(400, str(exc))
            return
        except AuthenticationError as exc:
            self._refuse(401, str(exc))
            return
        job_id = self.get_argument("job", None)
        wanted_user = self.get_argument("user", None)
        if not job_id and not wanted_user:
            self._refuse(400, "give ?job=ID or ?user=ID")
            return
        if wanted_user and wanted_user != user:
            self._refuse(403, "not your events")
            return
        raw_since = self.request.headers.get("Last-Event-ID") or self.get_argument("since", None)
        try:
            since = None if raw_since is None else parse_cursor(raw_since)
        except ValueError as exc:
            self._refuse(400, str(exc))
            return

        final_state = False
        if job_id:
            try:
                uuid.UUID(job_id)
            except ValueError:
                self._refuse(404, "no such job")
                return
            owner, final_state, known = await self._job_owner(job_id)
            if not known:
                self._refuse(404, "no such job")
                return
            if owner != user:
                self._refuse(403, "not your job")
                return
            key = job_stream(job_id)
            cursor = since if since and since != "$" else "0-0"
        else:
            key = user_stream(user)
            cursor = since if since and since != "$" else await self._last_id(key)

        # a finished job's events its stream no longer holds come from the ledger first
        older = await self._stored(job_id, key, cursor) if job_id else []
        try:
            nothing_new = (
                job_id is not None and not older and not await self._read(key, cursor, count=1)
            )
        except redis.RedisError as exc:
            if not refused_id(exc):
                raise
            self._refuse(400, f"{BAD_CURSOR}; Redis: {exc}")
            return
        if nothing_new and await self._ended(key, cursor, final_state):
            self.set_status(204)  # nothing left to send: an EventSource stops reconnecting
            self.finish()
            return

        state.connections += 1
        self.subscriber = None
        try:
            if older:
                self._open()
                if not await self._send(older, until_final=True):
                    return  # the job's final event was among them
                cursor = older[-1].id
            self.subscriber = await state.fanout.subscribe(key, cursor)
            if not older:
                self._open()
            await self._stream(self.subscriber, until_final=bool(job_id))
        except StreamClosedError:
            pass
        except redis.RedisError as exc:  # the client reconnects with Last-Event-ID
            if self.subscriber is None and refused_id(exc):  # nothing sent yet
                self._refuse(400, f"{BAD_CURSOR}; Redis: {exc}")
            elif not state.stopping:
                log.warning("events: Redis error on %s: %s; stream ended", key, exc)
            if not self._finished:
                self.finish()
        finally:
            state.connections -= 1
            if self.subscriber is not None:
                state.fanout.unsubscribe(self.subscriber)

    def _open(self) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        self.write(f"retry: {RETRY_MS}\n\n")

    async def _send(self, events: list[Event], until_final: bool) -> bool:
        """Send ``events`` (read from the ledger); False once the stream is finished."""
        for event in events:
            self.write(frame(event))
            self.state.events_sent += 1
            if until_final and event.final:
                await self.flush()
                self.finish()
                return False
        await self.flush()
        return True

    async def _catch_up(self, sub: Subscriber) -> bool:
        """Send what the ledger has after ``sub``'s position; False once finished."""
        job_id = self.get_argument("job")
        stored = await self._stored(job_id, sub.key, "{}-{}".format(*sub.last))
        if stored:
            sub.last = max(sub.last, id_key(stored[-1].id))
        return await self._send(stored, until_final=True)

    async def _stored(self, job_id: str, key: str, cursor: str) -> list[Event]:
        """The job's events after ``cursor`` its stream does not hold (it went after the job
        ended), from the ledger; ``[]`` when the stream holds them all."""
        try:
            first: Any = await self.state.redis.xrange(key, "-", "+", count=1)
            if holds_after(first, cursor):
                return []
        except redis.RedisError:
            return []  # the Redis read that follows reports it
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, self.state.history, job_id, cursor)
        except Exception as exc:  # the ledger is down: what Redis still has is sent
            log.warning("events: ledger history of job %s failed (%s)", job_id, exc)
            return []

    async def _stream(self, sub: Subscriber, until_final: bool) -> None:
        state = self.state
        await self.flush()
        while not self.closed and not state.stopping:
            try:
                event = await asyncio.wait_for(sub.queue.get(), state.heartbeat)
            except TimeoutError:
                self.write(": heartbeat\n\n")
                # a job's stream that went while we caught up: the rest is in the ledger
                if until_final and not await self._catch_up(sub):
                    return
                await self.flush()
                continue
            item = event
            while item is not None:
                self.write(item[1])
                state.events_sent += 1
                if until_final and item[0].final:
                    await self.flush()
                    self.finish()
                    return
                if sub.queue.empty():
                    break
                item = sub.queue.get_nowait()
            if item is None:  # shutdown, too far behind, or the client left
                break
            await self.flush()
        if not self._finished and not self.closed:
            self.finish()

    async def _read(self, key: str, cursor: str, count: int) -> list[Event]:
        reply: Any = await self.state.redis.xread({key: cursor}, count=count)
        return [Event.from_entry(i, f) for _k, entries in reply or [] for i, f in entries]

    async def _last_id(self, key: str) -> str:
        entries: Any = await self.state.redis.xrevrange(key, max="+", min="-", count=1)
        if not entries:
            return "0-0"
        entry_id = entries[0][0]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def _job_owner(self, job_id: str) -> tuple[str | None, bool, bool]:
        """(owner, ended per the ledger, known): the ledger first, the job's stream after."""
        loop = asyncio.get_running_loop()
        try:
            found = await loop.run_in_executor(None, self.state.lookup, job_id)
        except Exception as exc:  # the ledger is down: the job's events still say whose it is
            log.warning(
                "events: ledger lookup of job %s failed (%s); using its stream", job_id, exc
            )
            found = None
        if found is not None:
            owner, ledger_state = found
            return owner, ledger_state in FINAL_STATES, True
        first: Any = await self.state.redis.xrange(job_stream(job_id), "-", "+", count=1)
        if not first:
            return None, False, False
        event = Event.from_entry(first[0][0], first[0][1])
        return event.user_id, False, True

    async def _ended(self, key: str, cursor: str, ended_in_ledger: bool) -> bool:
        """Whether a job stream has nothing more to come for a client at ``cursor``."""
        recent: Any = await self.state.redis.xrevrange(key, max="+", min="-", count=10)
        if not recent:
            return ended_in_ledger  # its events expired after it ended
        return any(Event.from_entry(i, f).kind in FINAL_KINDS for i, f in recent)


def make_app(state: State) -> tornado.web.Application:
    return tornado.web.Application(
        [
            (r"/health", HealthHandler, {"state": state}),
            (r"/events", EventsHandler, {"state": state}),
        ]
    )


def serve(
    settings: Settings,
    address: str | None = None,
    port: int | None = None,
    on_listening: Callable[[str, int], None] | None = None,
    lookup: JobLookup | None = None,
) -> None:
    """Run the SSE server until SIGINT or SIGTERM (port 0: a free one, given to
    ``on_listening``)."""
    secret = secret_of(settings)
    address = address or settings.events_address
    port = settings.events_port if port is None else port

    async def main() -> None:
        # Short reads only (the fan-out's blocking read has its own connection): a bounded
        # pool that makes a burst of new clients wait their turn.
        client = async_redis_client(
            settings,  # one server or Sentinel (synth_workers.redisconn)
            max_connections=32,
            pool_timeout=30,
            socket_connect_timeout=5,
            socket_timeout=30,
        )
        ledger = Ledger(settings)
        fanout = Fanout(client, settings)
        fanout.start()
        state = State(
            client,
            fanout,
            secret,
            settings.events_heartbeat,
            lookup or ledger_lookup(ledger),
            token_max_ttl=settings.events_token_max_ttl,
            cors=CorsPolicy(settings.cors_origins),
            history=ledger_history(ledger),
        )
        sockets = tornado.netutil.bind_sockets(port, address)
        server = tornado.httpserver.HTTPServer(make_app(state), idle_connection_timeout=3600)
        server.add_sockets(sockets)
        actual = sockets[0].getsockname()[1]
        if on_listening is not None:
            on_listening(address, actual)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.stop()  # no new connections
        state.stopping = True
        await fanout.close()  # each open stream ends
        await client.aclose()
        deadline = time.monotonic() + 5
        while state.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await server.close_all_connections()
        ledger.close()

    asyncio.run(main())
