"""Writing and publishing a bulk send's jobs (``enqueue_many``, a ``group`` sent in bulk):
what every job of the send shares (:class:`Batch`), the rows (one multi-row ``INSERT`` per
chunk, :func:`insert_rows`), their messages and events (one Redis pipeline per chunk,
:func:`publish`), or both overlapped (:func:`overlapped`: the rows written while the
messages are published, ``synth_workers.ledger.early``). The API and its refusals are
``synth_workers.bulk``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
import redis
from kombu.exceptions import OperationalError
from kombu.utils import json as kombu_json
from psycopg import generators

from synth_workers import wire
from synth_workers.errors import EnqueueError
from synth_workers.ledger.early import EARLY
from synth_workers.lifecycle import JobEvent
from synth_workers.message import CaptureProducer
from synth_workers.publish import _send
from synth_workers.states import EventKind

if TYPE_CHECKING:
    from synth_workers.task import Task as PlatformTask

log = logging.getLogger(__name__)

#: Jobs per INSERT statement and per Redis pipeline.
CHUNK_SIZE = 1000
#: Compact JSON for the rows' payloads and arguments.
_json = kombu_json.JSONEncoder(separators=(",", ":")).encode


@dataclass(frozen=True, slots=True)
class Batch:
    """What every job of one bulk send shares (``enqueue_many``, a group sent in bulk)."""

    task: PlatformTask
    queue: str
    level: int
    wait: float | None = None
    user_id: str | None = None
    corr: str | None = None
    chunk_size: int = CHUNK_SIZE


def publish(
    batch: Batch,
    job_ids: Sequence[str],
    new: Sequence[int],
    outs: Sequence[wire.Outgoing] | None,
    captures: Sequence[CaptureProducer] | None,
    announce: bool = True,
) -> bool:
    """Announce (``queued`` or ``scheduled``; not when ``announce`` is false) and, unless
    ``wait``, publish the jobs just inserted (``new``: their indexes in ``job_ids`` and
    ``outs``/``captures``), one Redis pipeline per chunk. Should Redis fail, the rest stay
    queued in the ledger for the reconciler (logged), and ``False`` is returned."""
    task, wait, chunk_size = batch.task, batch.wait, batch.chunk_size
    app = task.app
    lifecycle = task.platform.ledger.lifecycle
    for start in range(0, len(new), chunk_size):
        part = new[start : start + chunk_size]
        events = _events(batch, job_ids, part) if announce else []
        try:
            if outs is not None:
                wire.publish(app, [] if wait else [outs[n] for n in part], lifecycle, events)
            else:
                for event in events:
                    lifecycle.emit(event)
                for n in [] if wait else part:
                    assert captures is not None
                    _send(task, captures[n])
        except (OperationalError, redis.RedisError, OSError) as exc:
            _unpublished(len(new) - start, exc)
            return False
    return True


def _publish_started(
    batch: Batch, job_ids: Sequence[str], outs: Sequence[wire.Outgoing]
) -> Callable[[], bool]:
    """:func:`publish` of one chunk of an overlapped send (every job of ``job_ids`` and
    ``outs``, announced, not delayed), written now: the function returned reads Redis's
    answer (``False``: not published, logged)."""
    lifecycle = batch.task.platform.ledger.lifecycle
    events = _events(batch, job_ids, range(len(job_ids)))
    try:
        finish = wire.publish_started(batch.task.app, outs, lifecycle, events)
    except (OperationalError, redis.RedisError, OSError) as exc:
        _unpublished(len(job_ids), exc)
        return lambda: False

    def finished() -> bool:
        try:
            finish()
        except (OperationalError, redis.RedisError, OSError) as exc:
            _unpublished(len(job_ids), exc)
            return False
        return True

    return finished


def _events(batch: Batch, job_ids: Sequence[str], part: Sequence[int]) -> list[JobEvent]:
    """The ``queued`` (or ``scheduled``) events of ``part`` (indexes in ``job_ids``); none
    when nothing listens."""
    if not batch.task.platform.ledger.lifecycle.listening:
        return []
    wait = batch.wait
    kind = EventKind.SCHEDULED if wait else EventKind.QUEUED
    data = {"priority": batch.level, "delay": wait} if wait else {"priority": batch.level}
    task, queue, user_id, corr = batch.task.name, batch.queue, batch.user_id, batch.corr
    return [
        JobEvent(kind, job_ids[n], task=task, queue=queue, user_id=user_id, correlation_id=corr,
                 data=data)
        for n in part
    ]  # fmt: skip


def _unpublished(count: int, exc: BaseException) -> None:
    log.warning(
        "bulk enqueue: %d job(s) recorded but not published (%s); the reconciler "
        "publishes them once Redis answers",
        count,
        exc,
    )


#: One chunk of an overlapped send (see :func:`overlapped`): its messages, payloads and
#: positional arguments (``None``: none for any).
Chunk = tuple[
    Sequence[wire.Outgoing], Sequence[dict[str, Any]], Sequence[Sequence[Any] | None] | None
]


def overlapped(batch: Batch, ids: list[str], make: Callable[[int, int], Chunk]) -> None:
    """Write the rows of fresh ids without keys and publish their messages, marked
    ``EARLY``, while Postgres writes them (``synth_workers.ledger.early``); return once the
    rows are committed. Chunk by chunk (``make(start, end)`` builds the messages of
    ``ids[start:end]``, so a large call never holds them all): its rows' statement, sent in
    one pipeline with the others (one implicit transaction, all or nothing), then its
    messages, whose Redis answer is read once the next chunk is built (Redis runs them
    meanwhile). Rows that revived a worker's tombstone are published again."""
    task, step = batch.task, batch.chunk_size
    ledger = task.platform.ledger
    cursors = []
    published = True
    answer: Callable[[], bool] | None = None  # the last chunk's messages, sent, unanswered
    with ledger.connection() as own:
        with own.pipeline():
            try:
                for start in range(0, len(ids), step):
                    outs, data, args = make(start, start + step)
                    texts = wire.stored_texts(outs, _json)
                    payloads, nulls = _columns(data, args, len(outs))
                    _mark(outs)  # after the rows' copies were made: those have no mark
                    cursors.append(
                        ledger.send_jobs_early(
                            own,
                            task=task.name,
                            queue=batch.queue,
                            priority=batch.level,
                            max_attempts=task.max_attempts,
                            user_id=batch.user_id,
                            correlation_id=batch.corr,
                            ids=ids[start : start + step],
                            payloads=payloads,
                            args=nulls,
                            messages=texts,
                        )
                    )
                    # the chunk's rows on the wire, then its messages while Postgres writes
                    # them; Redis runs them while the next chunk is built
                    own.wait(generators.send(own.pgconn))
                    if answer is not None:
                        published, answer = answer(), None
                    if published:
                        answer = _publish_started(batch, ids[start : start + step], outs)
            finally:
                if answer is not None:
                    answer()
        revived = {str(row[0]) for cursor in cursors for row in cursor.fetchall()}
    for start in range(0, len(ids), step) if revived else ():
        part = ids[start : start + step]
        again = [n for n, job_id in enumerate(part) if job_id in revived]
        if again:
            outs = _mark(make(start, start + step)[0])
            publish(batch, part, again, outs, None, announce=False)


def _mark(outs: Sequence[wire.Outgoing]) -> Sequence[wire.Outgoing]:
    """``outs``, each marked as published before its row (``synth_workers.ledger.early``)."""
    for out in outs:
        out.properties = {**out.properties, EARLY: True}
    return outs


def _columns(
    data: Sequence[dict[str, Any]],
    args: Sequence[Sequence[Any] | None] | None,
    count: int,
) -> tuple[list[str], list[str | None]]:
    """The rows' payloads and positional arguments as JSON text."""
    payloads = [_json(d) for d in data]
    nulls: list[str | None] = (
        [_json(list(a)) if a else None for a in args] if args is not None else [None] * count
    )
    return payloads, nulls


def insert_rows(
    batch: Batch,
    conn: psycopg.Connection[Any] | None,
    ids: list[str],
    keys: list[str | None],
    data: list[dict[str, Any]],
    messages: list[dict[str, Any]],
    args: Sequence[Sequence[Any] | None] | None = None,
) -> list[str]:
    """Write the rows (one statement per chunk, one transaction); every row's job id.
    ``args``: each job's positional arguments (``None``: none)."""
    task, chunk_size = batch.task, batch.chunk_size
    ledger = task.platform.ledger
    payloads, nulls = _columns(data, args, len(ids))
    texts = [_json(m) for m in messages]

    def write(c: psycopg.Connection[Any]) -> list[str]:
        found: list[str | None] = []
        for start in range(0, len(ids), chunk_size):
            end = start + chunk_size
            found += ledger.insert_jobs(
                c,
                task=task.name,
                queue=batch.queue,
                priority=batch.level,
                max_attempts=task.max_attempts,
                delay=batch.wait,
                published=conn is None,
                user_id=batch.user_id,
                correlation_id=batch.corr,
                ids=ids[start:end],
                keys=keys[start:end],
                payloads=payloads[start:end],
                args=nulls[start:end],
                messages=texts[start:end],
            )
        missing = [keys[n] for n, f in enumerate(found) if f is None]
        if missing:  # held by a transaction that committed meanwhile: its job
            holders = ledger.idempotency_holders(c, [k for k in missing if k is not None])
            found = [f if f is not None else holders.get(str(keys[n])) for n, f in enumerate(found)]
        if any(f is None for f in found):
            raise EnqueueError("idempotency key taken by a transaction that did not commit; retry")
        return [str(f) for f in found]

    if conn is not None:
        return write(conn)
    with ledger.connection() as own:
        if len(ids) <= chunk_size and ledger.durable_commits and not any(keys):
            return write(own)  # one statement in autocommit: one round trip
        with own.transaction():
            return write(own)
