"""Durable job events: lifecycle and progress on Redis Streams, a subscribe API, SSE.

- :mod:`synth_workers.events.stream`: the writer (a lifecycle listener the app factory
  connects); :mod:`synth_workers.events.subscription`: the reader (:class:`Subscription`);
- :mod:`synth_workers.events.history`: finished jobs' events stored in the ledger, so their
  Redis streams go a few seconds after the job ends (``SYNTH_EVENTS_GRACE``);
- :mod:`synth_workers.events.auth`: HS256 bearer tokens (``JWT_SECRET``);
  :func:`issue_token` makes one for a user (an application's login, a dashboard page);
- :mod:`synth_workers.events.server`: the Tornado SSE server (``synth-workers events serve``).

::

    for event in subscribe(user_id="u-1", since=last_seen_id):
        print(event.id, event.kind, event.job_id, event.data)
"""

from __future__ import annotations

import atexit
from typing import TYPE_CHECKING

from synth_workers.events.auth import issue_token
from synth_workers.events.buffer import EventBuffer
from synth_workers.events.history import HistoryArchive, ledger_history
from synth_workers.events.stream import (
    GLOBAL_STREAM,
    Event,
    EventWriter,
    events_client,
    job_stream,
    user_stream,
)
from synth_workers.events.subscription import Subscription

if TYPE_CHECKING:
    from synth_workers.app import SynthCelery
    from synth_workers.platform import Platform

__all__ = [
    "GLOBAL_STREAM",
    "Event",
    "EventBuffer",
    "EventWriter",
    "Subscription",
    "connect_events",
    "events_client",
    "issue_token",
    "job_stream",
    "subscribe",
    "user_stream",
]


def connect_events(app: Platform) -> EventBuffer:
    """Write every job state change ``app``'s ledger announces to Redis Streams (hot-path
    kinds batched from a background thread: see :mod:`synth_workers.events.buffer`).
    Returns the listener; call its ``flush()`` when a process stops."""
    settings = app.settings
    writer = EventWriter(
        events_client(settings, settings.redis_timeout),
        retention=settings.events_retention,
        maxlen=settings.events_maxlen,
        job_ttl=settings.job_ttl,
    )
    # finished jobs' events go to the ledger; their streams then go (events.history)
    writer.archive = HistoryArchive(app.ledger, writer.client, grace=settings.events_grace)
    buffer = EventBuffer(writer)
    app.lifecycle.connect(buffer)
    atexit.register(buffer.flush)  # flushes the archive too
    return buffer


def subscribe(
    user_id: str | None = None,
    job_id: str | None = None,
    since: str | None = None,
    *,
    timeout: float | None = None,
    until_final: bool = True,
    app: SynthCelery | None = None,
) -> Subscription:
    """Iterate events as they come: one job's (``job_id``; its whole history unless
    ``since``; ends after its final event), one user's (``user_id``: all their jobs), or
    every job's (neither). With both, only the job's events that carry ``user_id``.

    ``since``: the last event id already seen (exclusive). ``timeout``: seconds in all
    before the iteration ends (``None``: never).
    """
    if app is None:
        from synth_workers.app import app as default_app

        app = default_app
    settings = app.settings
    return Subscription(
        # its XREAD blocks up to Subscription.block_ms (1 s) on the server
        events_client(settings, settings.redis_timeout, blocking=1.0),
        job_id=job_id,
        user_id=user_id,
        since=since,
        timeout=timeout,
        until_final=until_final,
        history=ledger_history(app.ledger),  # a finished job's events once its stream went
    )
