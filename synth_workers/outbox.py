"""The outbox: jobs sent inside a ledger transaction are written in it and published after
it commits (the reconciler publishes rows whose publish never happened).

``apply_async(..., synth_conn=conn)`` names the transaction for one send; :func:`outbox`
names it for every send made inside a block, canvas included: Celery copies a signature's
options (``deepcopy``) when it applies a group or a chord, which a connection cannot survive,
so a chord's callback is fired through the block instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import psycopg

_current: ContextVar[psycopg.Connection[Any] | None] = ContextVar("synth_outbox", default=None)


@contextmanager
def outbox(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Connection[Any]]:
    """Every job sent in this block is written in ``conn``'s transaction."""
    token = _current.set(conn)
    try:
        yield conn
    finally:
        _current.reset(token)


def current() -> psycopg.Connection[Any] | None:
    """The transaction of the enclosing :func:`outbox` block, if any."""
    return _current.get()
