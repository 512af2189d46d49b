"""Bulk enqueue: ``enqueue_many(task_name, payloads, ...)``, many jobs of one task at once.

The same refusals as :func:`~synth_workers.producer.enqueue`, all before anything is written:
an unknown task, a payload that does not validate, is not strict JSON or is over
``SYNTH_MAX_PAYLOAD_BYTES`` (the message names the item's index), a bad idempotency key,
delay, priority or queue, and Redis or Postgres out of reach (a ``PING`` on the broker's
connection first). One refused item refuses the call: **all or nothing**.

Then one multi-row ``INSERT`` per chunk of ``chunk_size`` jobs, all chunks in one
transaction (one statement in autocommit when there is one chunk), idempotency keys taken in
the same statement: a key a live job holds returns that job's handle (``deduplicated``), and
so does a key repeated within the call (its first item's job). A Postgres failure writes
nothing. Once committed, each chunk's messages and ``queued`` events go to Redis in one
pipeline (``synth_workers.wire``). Should Redis fail then, the jobs are recorded and queued
in the ledger: the reconciler publishes them once Redis answers (after
``SYNTH_RECONCILE_GRACE``), and the call still returns their handles (logged as a warning),
so a caller that retries does not enqueue them twice.

Without idempotency keys (and outside worker processes), the rows and the messages overlap
(``synth_workers.bulkrows.overlapped``): every chunk's ``INSERT`` goes in one pipeline (one
implicit transaction, all or nothing), and the messages, marked as published before their
rows (``synth_workers.ledger.early``), are published while Postgres writes them; the call
returns once the rows are committed. Should Postgres refuse a row then, the call raises and
no job runs: a worker tombstones each such message instead of running it.

Handles come back in input order. ``delay=`` makes every job wait in the ledger; ``conn=``
writes them in the caller's transaction (the outbox: published once it commits).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import psycopg
import redis
from celery import Task
from kombu.exceptions import OperationalError
from pydantic import BaseModel

from synth_workers import correlation, routing, wire, wiremany
from synth_workers.bulkrows import CHUNK_SIZE, Batch, Chunk, insert_rows, overlapped, publish
from synth_workers.errors import (
    EnqueueError,
    PayloadTooLargeError,
    PayloadValidationError,
)
from synth_workers.message import CaptureProducer
from synth_workers.producer import JobHandle, _default_app, _lookup, _unavailable, _validated
from synth_workers.publish import _message, placement
from synth_workers.routing import to_transport
from synth_workers.uuids import uuid4s
from synth_workers.validation import check_delay, check_idempotency_key, payload_size

if TYPE_CHECKING:
    from synth_workers.app import SynthCelery
    from synth_workers.task import Task as PlatformTask

log = logging.getLogger(__name__)


def _item_error(index: int, exc: EnqueueError) -> EnqueueError:
    """``exc`` about item ``index``, of the same class."""
    error = type(exc)(f"item {index}: {exc}")
    error.__cause__ = exc
    return error


def _checked(
    task: PlatformTask, payloads: Sequence[Any], keys: Sequence[str | None], cap: int
) -> list[dict[str, Any]]:
    """Every payload validated and sized; the first refusal names its item."""
    data: list[dict[str, Any]] = []
    for index, payload in enumerate(payloads):
        try:
            item = _validated(task, payload if payload is not None else {})
            size = payload_size(None, item)
            if size > cap:
                raise PayloadTooLargeError(
                    f"{task.name}: payload is {size} bytes, over the {cap}-byte cap "
                    "(SYNTH_MAX_PAYLOAD_BYTES); store large inputs elsewhere and pass a reference"
                )
            if keys[index] is not None:
                check_idempotency_key(keys[index])
        except EnqueueError as exc:
            raise _item_error(index, exc) from exc
        data.append(item)
    return data


def _messages(
    task: PlatformTask,
    ids: Sequence[str],
    data: Sequence[dict[str, Any]],
    options: dict[str, Any],
    queue_given: bool,
    first: wire.Outgoing | None = None,
) -> tuple[list[wire.Outgoing] | None, list[CaptureProducer] | None]:
    """Each job's message, as Celery would build it: by :mod:`synth_workers.wire` (the first
    built, unless given, the others its siblings when the queue was given), else by Celery's
    own ``apply_async`` on a capturing producer."""
    first = first or wire.build(task, (), data[0], {**options, "task_id": ids[0]})
    if first is not None:
        out = [first]
        limits = wiremany.repr_limits(task.app)
        for job_id, item in zip(ids[1:], data[1:], strict=True):
            if queue_given:
                out.append(wiremany.sibling(first, task.app, job_id, (), item, limits))
            else:
                built = wire.build(task, (), item, {**options, "task_id": job_id})
                assert built is not None
                out.append(built)
        return out, None
    captures = []
    for job_id, item in zip(ids, data, strict=True):
        captures.append(
            _message(
                task, (), item, {**options, "task_id": job_id}, partial(Task.apply_async, task)
            )
        )
    return None, captures


def check_redis(app: SynthCelery) -> None:
    """Redis answers (else nothing is written and the caller hears it)."""
    try:
        with (
            app.producer_or_acquire(None) as producer,
            producer.channel.conn_or_acquire() as client,
        ):
            client.ping()
    except (OperationalError, redis.RedisError, OSError) as exc:
        raise _unavailable(app, exc) from exc


def enqueue_many(
    task_name: str,
    payloads: Iterable[BaseModel | Mapping[str, Any] | None],
    *,
    priority: routing.Priority | None = None,
    delay: float | None = None,
    idempotency_keys: Sequence[str | None] | None = None,
    queue: str | None = None,
    gpu: bool = False,
    conn: psycopg.Connection[Any] | None = None,
    user_id: str | None = None,
    correlation_id: str | None = None,
    deferrable: bool = False,
    chunk_size: int = CHUNK_SIZE,
    app: SynthCelery | None = None,
) -> list[JobHandle]:
    """Enqueue one job of ``task_name`` per payload, all or nothing; return their handles in
    input order. ``idempotency_keys``: one per payload (``None`` for none). The other
    options mean what they mean for :func:`~synth_workers.producer.enqueue`, for every job."""
    app = app or _default_app()
    task = _lookup(app, task_name)
    items = list(payloads)
    keys: list[str | None] = list(idempotency_keys) if idempotency_keys is not None else []
    if idempotency_keys is None:
        keys = [None] * len(items)
    if len(keys) != len(items):
        raise PayloadValidationError(
            f"idempotency_keys has {len(keys)} keys for {len(items)} payloads"
        )
    if chunk_size < 1:
        raise PayloadValidationError(f"chunk_size must be at least 1, got {chunk_size}")
    if not items:
        return []
    settings = app.settings
    placed = placement(task, priority, queue, gpu=gpu)
    wait = None
    if delay is not None and delay != 0:  # NaN is != 0: refused by the check
        wait = check_delay(delay, settings.max_delay_seconds)
    data = _checked(task, items, keys, settings.max_payload_bytes)
    options: dict[str, Any] = {"synth_correlation_id": correlation_id}
    corr = correlation.for_send(options)
    options.pop("synth_correlation_id", None)
    if deferrable:
        options["headers"] = {**(options.get("headers") or {}), "synth_deferrable": True}
    options["priority"] = to_transport(placed.priority)
    if placed.queue is not None:
        options["queue"] = placed.queue
    # a key repeated within the call: its first item's job
    first_of: dict[str, int] = {}
    same_as: dict[int, int] = {}
    for index, key in enumerate(keys):
        if key is not None:
            if key in first_of:
                same_as[index] = first_of[key]
            else:
                first_of[key] = index
    todo = [i for i in range(len(items)) if i not in same_as]
    ids = uuid4s(len(items))
    early = conn is None and wait is None and not any(keys) and task.platform.ledger.durable_commits
    given = placed.queue is not None
    # one message wire.build makes, or none (no side effect then: Celery builds them all)
    first = wire.build(task, (), data[0], {**options, "task_id": ids[0]}) if early else None
    if first is not None:
        check_redis(app)
        goes_to = placed.queue or first.routing_key
        batch = Batch(task, goes_to, placed.priority, None, user_id, corr, chunk_size)

        def make(start: int, end: int) -> Chunk:  # a chunk's messages, built when sent
            model = first if start == 0 else None  # the first message, built above
            built = _messages(task, ids[start:end], data[start:end], options, given, model)[0]
            assert built is not None
            return built, data[start:end], None

        overlapped(batch, ids, make)
        return [JobHandle(job_id, app=app) for job_id in ids]
    outs, captures = _messages(
        task, [ids[i] for i in todo], [data[i] for i in todo], options, given
    )
    stored = (
        [o.stored() for o in outs] if outs is not None else [c.message() for c in captures or ()]
    )
    routed = outs[0].routing_key if outs else (captures[0].queue() if captures else None)
    target = placed.queue or routed or task.app.conf.task_default_queue
    publish_now = conn is None and wait is None
    if publish_now:
        check_redis(app)
    batch = Batch(task, target, placed.priority, wait, user_id, corr, chunk_size)
    actual = insert_rows(
        batch,
        conn,
        [ids[i] for i in todo],
        [keys[i] for i in todo],
        [data[i] for i in todo],
        stored,
    )
    found: dict[int, str] = dict(zip(todo, actual, strict=True))
    handles = [
        JobHandle(
            found[same_as.get(i, i)], app=app, deduplicated=found[same_as.get(i, i)] != ids[i]
        )
        for i in range(len(items))
    ]
    if conn is not None:
        return handles
    new = [n for n, i in enumerate(todo) if actual[n] == ids[i]]
    publish(batch, actual, new, outs, captures)
    return handles
