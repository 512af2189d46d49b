"""Event ids as cursors (``Last-Event-ID``, ``since``): checked before any Redis call."""

from __future__ import annotations

import re

import redis

#: ``<ms>`` or ``<ms>-<seq>``, ASCII digits only (``\d`` would take other scripts' digits).
_EVENT_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?")
#: Each part of a stream id is an unsigned 64-bit integer.
MAX_ID_PART = 2**64 - 1
BAD_CURSOR = (
    "Last-Event-ID / since must be an event id: <ms> or <ms>-<seq>, each an integer "
    f"from 0 to {MAX_ID_PART} (or 0, or $)"
)


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
