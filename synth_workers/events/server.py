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
import re
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aioredis
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
from synth_workers.events.cors import CorsHandler, CorsPolicy
from synth_workers.events.fanout import Fanout, Subscriber
from synth_workers.events.stream import Event, job_stream, user_stream
from synth_workers.ledger import Ledger
from synth_workers.settings import Settings
from synth_workers.states import FINAL_KINDS, FINAL_STATES

log = logging.getLogger(__name__)

#: ``<ms>`` or ``<ms>-<seq>``, ASCII digits only (``\d`` would take other scripts' digits).
_EVENT_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
#: Each part of a stream id is an unsigned 64-bit integer.
MAX_ID_PART = 2**64 - 1
BAD_CURSOR = (
    "Last-Event-ID / since must be an event id: <ms> or <ms>-<seq>, each an integer "
    f"from 0 to {MAX_ID_PART} (or 0, or $)"
)
#: Browsers wait this long (ms) before reconnecting a dropped stream.
RETRY_MS = 2000

#: ``job id -> (owner user id, ledger state)``, ``None`` when the ledger has no such job.
JobLookup = Callable[[str], "tuple[str | None, str] | None"]


def parse_cursor(raw: str) -> str:
    """``since`` / ``Last-Event-ID`` as a stream id Redis accepts: ``$`` as it is, an id as
    ``<ms>-<seq>``; :class:`ValueError` otherwise (never sent to Redis)."""
    if raw == "$":
        return raw
    found = _EVENT_ID.fullmatch(raw)  # not match: "$" would let a trailing newline in
    if found is None:
        raise ValueError(BAD_CURSOR)
    ms, seq = int(found[1]), int(found[2] or 0)
    if ms > MAX_ID_PART or seq > MAX_ID_PART:
        raise ValueError(BAD_CURSOR)
    return f"{ms}-{seq}"


def refused_id(exc: redis.RedisError) -> bool:
    """Whether Redis refused a command for its stream id ("Invalid stream ID ...")."""
    return isinstance(exc, redis.ResponseError) and " id " in f" {exc} ".lower()


class State:
    """What every handler of one server shares."""

    def __init__(
        self,
        redis_client: aioredis.Redis,
        fanout: Fanout,
        secret: str,
        heartbeat: float,
        lookup: JobLookup,
        token_max_ttl: float,
        cors: CorsPolicy | None = None,
    ) -> None:
        self.redis = redis_client
        self.fanout = fanout
        self.secret = secret
        #: The furthest ahead (seconds) a token's ``exp`` may lie.
        self.token_max_ttl = token_max_ttl
        self.heartbeat = heartbeat
        self.lookup = lookup
        self.cors = cors or CorsPolicy(())
        self.started = time.time()
        self.connections = 0
        self.events_sent = 0
        #: Set at shutdown: open streams end (their clients reconnect elsewhere, resuming).
        self.stopping = False


class Handler(CorsHandler):
    def initialize(self, state: State) -> None:
        self.state = state
        self.cors = state.cors
        self.set_default_headers()  # the constructor set them before ``cors`` was here


class HealthHandler(Handler):
    def get(self) -> None:
        state = self.state
        self.write(
            {
                "status": "ok",
                "connections": state.connections,
                "events_sent": state.events_sent,
                "uptime_seconds": round(time.time() - state.started, 3),
            }
        )


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

        try:
            nothing_new = job_id is not None and not await self._read(key, cursor, count=1)
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
            self.subscriber = await state.fanout.subscribe(key, cursor)
            self.set_header("Content-Type", "text/event-stream; charset=utf-8")
            self.set_header("Cache-Control", "no-cache")
            self.set_header("X-Accel-Buffering", "no")
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

    async def _stream(self, sub: Subscriber, until_final: bool) -> None:
        state = self.state
        self.write(f"retry: {RETRY_MS}\n\n")
        await self.flush()
        while not self.closed and not state.stopping:
            try:
                event = await asyncio.wait_for(sub.queue.get(), state.heartbeat)
            except TimeoutError:
                self.write(": heartbeat\n\n")
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


def ledger_lookup(ledger: Ledger) -> JobLookup:
    """Owner and state of a job, read from the ledger."""

    def lookup(job_id: str) -> tuple[str | None, str] | None:
        row = ledger.get(job_id)
        if row is None:
            return None
        return row["user_id"], str(row["state"])

    return lookup


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
        pool = aioredis.BlockingConnectionPool.from_url(
            settings.broker_url,
            max_connections=32,
            timeout=30,
            socket_connect_timeout=5,
            socket_timeout=30,
        )
        client = aioredis.Redis(connection_pool=pool)
        ledger = Ledger(settings)
        fanout = Fanout(client, settings.broker_url)
        fanout.start()
        state = State(
            client,
            fanout,
            secret,
            settings.events_heartbeat,
            lookup or ledger_lookup(ledger),
            token_max_ttl=settings.events_token_max_ttl,
            cors=CorsPolicy(settings.cors_origins),
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
