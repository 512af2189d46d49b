"""Reading job events: :class:`Subscription` follows one stream (a job's, a user's or the
global one) in order, blocking for new events.

A job's subscription given a ``history`` (the ledger's copy, see
:mod:`synth_workers.events.history`) reads there first whatever its cursor needs that the
job's stream no longer holds (the stream went a few seconds after the job ended), then goes
on in Redis from the last event it got: nothing missed, nothing twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import redis

from synth_workers.events.stream import (
    GLOBAL_STREAM,
    Event,
    HistoryReader,
    as_text,
    id_key,
    job_stream,
    user_stream,
)


def stream_for(job_id: str | None = None, user_id: str | None = None) -> str:
    """The stream to read: a job's, else a user's, else the global one."""
    if job_id:
        return job_stream(job_id)
    if user_id:
        return user_stream(user_id)
    return GLOBAL_STREAM


def read_range(client: redis.Redis, key: str, since: str | None, count: int = 1000) -> list[Event]:
    """Events of ``key`` after ``since`` (exclusive; ``None``: from the start)."""
    start = "-" if not since or since in ("0", "0-0") else f"({since}"
    entries: Any = client.xrange(key, min=start, max="+", count=count)
    return [Event.from_entry(i, f) for i, f in entries]


def last_id(client: redis.Redis, key: str) -> str:
    """The id of the newest event of ``key`` ("0-0" when it has none)."""
    entries: Any = client.xrevrange(key, max="+", min="-", count=1)
    if not entries:
        return "0-0"
    entry_id = entries[0][0]
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


class Subscription:
    """An iterator over events of one stream, in order, blocking for new ones.

    ``since``: the id of the last event already seen (exclusive); ``None`` starts from the
    whole history for a job, from now on for a user or the global stream. The iteration ends
    after ``timeout`` seconds in all (``None``: never), and, for a job with ``until_final``,
    after the job's final event.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        job_id: str | None = None,
        user_id: str | None = None,
        since: str | None = None,
        timeout: float | None = None,
        until_final: bool = True,
        block_ms: int = 1000,
        history: HistoryReader | None = None,
    ) -> None:
        self.client = client
        #: A job's events no longer in Redis (its stream went after the job ended).
        self.history = history if job_id else None
        self.job_id = job_id
        self.user_id = user_id
        self.key = stream_for(job_id, user_id)
        self.timeout = timeout
        self.until_final = until_final and job_id is not None
        self.block_ms = block_ms
        self.since = since
        #: Set when the iteration stopped because ``timeout`` ran out.
        self.timed_out = False

    def __iter__(self) -> Iterator[Event]:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        cursor = self.since
        if cursor is None:
            cursor = "0-0" if self.job_id else last_id(self.client, self.key)
        stored: list[Event] = []
        first = None if self.history is None else self.client.xrange(self.key, count=1)
        if self.history is not None and not holds_after(first, cursor):
            stored = self._stored(cursor)
        while True:
            block = self.block_ms
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.timed_out = True
                    return
                block = max(1, min(block, int(left * 1000)))
            if stored:
                events, stored = stored, []
            else:
                reply: Any = self.client.xread({self.key: cursor}, count=500, block=block)
                events = [Event.from_entry(i, f) for _k, entries in reply or [] for i, f in entries]
                if not events and self.history is not None and not self.client.exists(self.key):
                    # the stream went (the job ended a while ago): the rest is in the ledger
                    events = self._stored(cursor)
            for event in events:
                cursor = event.id
                if self.user_id and self.job_id and event.user_id != self.user_id:
                    continue
                yield event
                if self.until_final and event.final:
                    return

    def _stored(self, cursor: str) -> list[Event]:
        assert self.history is not None and self.job_id is not None
        return self.history(self.job_id, cursor)


def holds_after(first: Any, cursor: str) -> bool:
    """Whether a stream whose ``XRANGE - + COUNT 1`` answered ``first`` holds every event
    after ``cursor``: it exists and its first event is not after ``cursor`` (otherwise
    older events may be in the ledger only)."""
    try:
        after = id_key(cursor)
    except ValueError:  # "$": from now on, what Redis has is all there is
        return True
    return bool(first) and id_key(as_text(first[0][0])) <= after
