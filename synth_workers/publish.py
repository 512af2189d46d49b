"""Sending a job: capture its Celery message, write its ledger row (one INSERT), publish.
``Task.apply_async`` (and so ``delay``, ``enqueue`` and beat) hands every send to :func:`send`.

- **Placement once.** A job's priority (the platform's scale, ``synth_workers.routing``) and
  queue are resolved once, by :func:`placement`; ``enqueue`` resolves them itself (its
  ``gpu=`` and error order) and hands the result over, so nothing resolves them again.
- **Refusals first.** The payload (strict JSON, ``SYNTH_MAX_PAYLOAD_BYTES``), the
  idempotency key and the delay are checked (``synth_workers.validation``) before anything
  is written to Postgres or Redis.
- **The message is the job.** Celery's own ``apply_async`` builds the message on a
  :class:`~synth_workers.message.CaptureProducer`; the row is written with it, then it is
  published. A delayed job, or one written in the caller's transaction (``synth_conn=``,
  the outbox), is only a row until the sweeper publishes it. A plain send of a fresh id
  with no idempotency key publishes while its row's ``INSERT`` is in flight, and returns
  once the row is committed (:func:`_overlapped`, ``synth_workers.ledger.early``).
- **A failed publish** leaves a tombstone, never a queued row (:func:`publish_failed`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
import redis
from kombu.exceptions import OperationalError as KombuOperationalError

from synth_workers import correlation, outbox, tracing, wire
from synth_workers.confview import setting
from synth_workers.errors import PayloadTooLargeError
from synth_workers.ledger import early
from synth_workers.lifecycle import JobEvent, ListenerTimeout
from synth_workers.message import CaptureProducer
from synth_workers.routing import Priority, queue_for_task, resolve_priority, resolve_queue
from synth_workers.routing import to_transport as transport_priority
from synth_workers.states import EventKind
from synth_workers.validation import (
    check_delay,
    check_idempotency_key,
    eta_delay,
    expires_at,
    payload_size,
)

if TYPE_CHECKING:
    from synth_workers.task import Task

log = logging.getLogger(__name__)

#: ``apply_async`` option carrying a :class:`Placement` already resolved (by ``enqueue``).
PLACEMENT_OPTION = "synth_placement"
#: ``apply_async`` option: ``enqueue`` generated the task id itself (``maybe_waited``).
FRESH_ID_OPTION = "synth_fresh_id"
#: ``apply_async`` option: the overlapped send returns the job's id (``enqueue`` makes its
#: own handle), not an ``AsyncResult``; every other send still returns its result.
ID_ONLY_OPTION = "synth_id_only"

#: Celery's own ``apply_async`` (the task's ``super().apply_async``).
CelerySend = Callable[..., Any]


@dataclass(frozen=True)
class Placement:
    """Where one job goes, resolved once: its level (0-9, bigger first) and its queue;
    ``None``: Celery's router decides (an adopted app's routes), read from the message."""

    priority: int
    queue: str | None


def queue_name(queue: Any) -> str | None:
    """A queue option's name (a kombu ``Queue`` or a string)."""
    if queue is None or isinstance(queue, str):
        return queue
    return str(getattr(queue, "name", queue))


def placement(
    task: Task, priority: Priority | None, queue: Any = None, *, gpu: bool = False
) -> Placement:
    """Resolve a job's priority (``None``: ``normal``) and queue: ``gpu=`` and an explicit
    ``queue`` first (``routing.resolve_queue``), else the task's own ``queue``, else, on the
    platform's own app, the route of its name; else ``None`` (Celery's router decides).
    Raises ``RoutingError``."""
    level = resolve_priority(priority)
    target = resolve_queue(task.name, queue_name(queue), gpu=gpu)
    if target is None:
        target = queue_name(getattr(task, "queue", None))
    if target is None and task.platform.routes_by_kind:  # the platform's own app
        target = queue_for_task(task.name)
    return Placement(level, target)


def _delay(options: dict[str, Any], limit: float) -> float | None:
    """Seconds the job waits (``countdown=`` or ``eta=``), checked against ``limit``."""
    countdown = options.pop("countdown", None)
    eta = options.pop("eta", None)
    if countdown is not None and countdown != 0:  # NaN is != 0: refused by the check
        return check_delay(countdown, limit)
    if eta is not None:
        return eta_delay(eta, limit)
    return None


def _first_attempt(task: Task) -> bool:
    """Whether this send is made outside any job, or by a job's first attempt (see
    ``Ledger.insert_job``'s ``rerun_finished``): a later attempt may be repeating a send its
    first attempt made before its worker died."""
    current = task.app.current_worker_task
    claim = getattr(getattr(current, "request", None), "synth_claim", None)
    return claim is None or int(claim.attempt) <= 1


def send(
    task: Task, args: Any, kwargs: Any, options: dict[str, Any], celery_send: CelerySend
) -> Any:
    """Write the job's ledger row, then publish it (unless delayed or transactional); see
    ``Task.apply_async`` for the options. ``celery_send`` is Celery's own ``apply_async``,
    which builds the message (and sends it, eagerly, under ``task_always_eager``)."""
    settings = task.platform.settings
    dump_models = getattr(task, "_dump_pydantic_arguments", None)
    if dump_models is not None and options.get("serializer") != "pickle":
        # Celery's ``pydantic=True``: models the caller passes are sent as their dumps
        args, kwargs = dump_models(args, kwargs)
    placed: Placement | None = options.pop(PLACEMENT_OPTION, None)
    # An id made here or by enqueue() is known to no one before the row commits.
    fresh = bool(options.pop(FRESH_ID_OPTION, False)) or not options.get("task_id")
    id_only = bool(options.pop(ID_ONLY_OPTION, False))
    level = options.pop("priority", None)
    if placed is None:
        placed = placement(
            task, task.priority if level is None else level, options.get("queue") or None
        )
    conn: psycopg.Connection[Any] | None = options.pop("synth_conn", None) or outbox.current()
    key: str | None = options.pop("synth_idempotency_key", None)
    user_id: str | None = options.pop("synth_user_id", None)
    if options.pop("synth_deferrable", False):  # may wait for a batch (synth_workers.batchtier)
        options["headers"] = {**(options.get("headers") or {}), "synth_deferrable": True}
    # Refusals first: nothing is written to Postgres or Redis before these pass.
    if key is not None:
        check_idempotency_key(key)
    # the caller's request id, into the message's headers (synth_workers.correlation)
    correlation_id = correlation.for_send(options)
    delay = _delay(options, settings.max_delay_seconds)
    size = payload_size(args, kwargs)
    cap = settings.max_payload_bytes
    if size > cap:
        raise PayloadTooLargeError(
            f"{task.name}: payload is {size} bytes, over the {cap}-byte cap "
            "(SYNTH_MAX_PAYLOAD_BYTES); store large inputs elsewhere and pass a reference"
        )
    job_id: str = options.get("task_id") or str(uuid.uuid4())
    options["task_id"] = job_id
    ledger = task.platform.ledger
    row: dict[str, Any] = {
        "job_id": job_id,
        "task": task.name,
        # None: Celery's router decides (an adopted app's routes), read from the message
        "queue": placed.queue,
        "priority": placed.priority,
        "payload": dict(kwargs or {}),
        "args": list(args) if args else None,
        "delay": delay,
        "idempotency_key": key,
        "max_attempts": task.max_attempts,
        "published": conn is None,
        "user_id": user_id,
        "expires_at": expires_at(options.get("expires")),
        "rerun_finished": _first_attempt(task),
        "correlation_id": correlation_id,
        # an outbox row is written in the caller's open transaction, the handle already theirs
        "maybe_waited": not fresh or conn is not None,
    }
    options["priority"] = transport_priority(placed.priority)
    given = queue_name(options.get("queue") or getattr(task, "queue", None))
    if placed.queue is not None and placed.queue != given:
        options["queue"] = placed.queue
    eager = bool(setting(task.app.conf, "task_always_eager"))
    out: wire.Outgoing | None = None
    if not eager:  # the message, built as Celery builds it, is stored with the row
        out = wire.build(task, args, kwargs, options)
        if out is not None:
            row["message"] = out.stored()
            if placed.queue is None:
                row["queue"] = out.routing_key
        else:  # Celery's own apply_async builds it (canvas, expires, signals, ...)
            capture = _message(task, args, kwargs, options, celery_send)
            row["message"] = capture.message()
            if placed.queue is None:
                row["queue"] = capture.queue()
    if row["queue"] is None:
        row["queue"] = setting(task.app.conf, "task_default_queue")
    with tracing.span("synth.ledger.insert", job_id=job_id, task=task.name):
        if conn is not None:
            actual = ledger.insert_job(conn, **row)
            return task.AsyncResult(actual)
        if key is None and ledger.durable_commits:
            if out is not None and fresh and not delay:
                # the row's INSERT and the publish overlap (synth_workers.ledger.early)
                return _overlapped(task, row, out, id_only)
            # One statement in autocommit: a single round trip (no BEGIN/COMMIT).
            with ledger.connection() as own:
                actual = ledger.insert_job(own, **row)
        else:  # the key's upsert and the row commit together; durable in worker processes
            with ledger.connection() as own, own.transaction():
                actual = ledger.insert_job(own, **row)
    if actual != job_id:
        return task.AsyncResult(actual)
    event = _event(task, row)
    lifecycle = ledger.lifecycle
    if out is not None and not delay:
        # the queued event and the message in one Redis round trip (synth_workers.wire)
        try:
            with tracing.span("synth.publish", job_id=job_id, task=task.name):
                wire.publish(task.app, [out], lifecycle, [event] if lifecycle.listening else [])
        except BaseException as exc:
            return publish_failed(task, job_id, exc)
        result = task.AsyncResult(job_id)
        result.ignored = out.ignore_result  # Celery's: get() returns None
        return result
    if lifecycle.listening:
        try:
            # The event went to the broker's Redis and it did not answer within
            # SYNTH_REDIS_TIMEOUT: publishing would wait for it as long again.
            lifecycle.emit(event, raise_timeouts=not delay)
        except ListenerTimeout as exc:
            return publish_failed(task, job_id, exc)
    if delay:
        return task.AsyncResult(actual)
    if eager:
        return celery_send(args, kwargs, **options)
    try:
        with tracing.span("synth.publish", job_id=job_id, task=task.name):
            return _publish(task, capture, options.get("producer"))
    except BaseException as exc:
        return publish_failed(task, job_id, exc)


def _event(task: Task, row: dict[str, Any]) -> JobEvent:
    """The job's ``queued`` (or ``scheduled``) event."""
    delay, level = row["delay"], row["priority"]
    return JobEvent(
        EventKind.SCHEDULED if delay else EventKind.QUEUED,
        row["job_id"],
        task=task.name,
        queue=row["queue"],
        user_id=row["user_id"],
        correlation_id=row["correlation_id"],
        data={"priority": level, "delay": delay} if delay else {"priority": level},
    )


def _overlapped(task: Task, row: dict[str, Any], out: wire.Outgoing, id_only: bool = False) -> Any:
    """Send the row's ``INSERT``, publish the message (and its ``queued`` event) while it
    runs, then wait for it: the row is committed when this returns. The message is marked
    :data:`~synth_workers.ledger.early.EARLY` (see that module for what a worker does with a
    message that comes before its row); one a worker dropped for that is published again.
    Returns the job's ``AsyncResult``, or its id when ``id_only``."""
    job_id = row["job_id"]
    ledger = task.platform.ledger
    lifecycle = ledger.lifecycle
    events = [_event(task, row)] if lifecycle.listening else []
    out.properties = {**out.properties, early.EARLY: True}  # the row's copy has no mark
    failed: BaseException | None = None
    with ledger.connection() as own:
        pending = early.send_insert(own, row)
        try:
            with tracing.span("synth.publish", job_id=job_id, task=task.name):
                wire.publish(task.app, [out], lifecycle, events)
        except BaseException as exc:
            failed = exc
        revived = pending.result()  # raises when the row did not commit
    try:
        if failed is not None:
            raise failed
        if revived:
            wire.publish(task.app, [out], lifecycle, [])
    except BaseException as exc:
        return publish_failed(task, job_id, exc)
    if id_only:
        return job_id
    result = task.AsyncResult(job_id)
    result.ignored = out.ignore_result  # Celery's: get() returns None
    return result


def _message(
    task: Task, args: Any, kwargs: Any, options: dict[str, Any], celery_send: CelerySend
) -> CaptureProducer:
    """Celery's own ``apply_async`` builds and routes the message (canvas, ids, expires,
    time limits, stamps: everything Celery puts in it) on a :class:`CaptureProducer`,
    which keeps it instead of sending it (``synth_workers.message``). Celery's
    ``before_task_publish``/``after_task_publish`` signals fire here, once per send."""
    capture = CaptureProducer()
    celery_send(args, kwargs, **{**options, "producer": capture})
    if not capture.captured:
        raise RuntimeError(f"{task.name}: Celery built no message to send")
    return capture


def _publish(task: Task, capture: CaptureProducer, producer: Any = None) -> Any:
    """Send the captured message (Celery's own publish retries are off: see
    ``celery_config``), retried once at once when it failed fast with a connection
    error: a socket Redis reset or closed (restarted, failed over) fails before any
    wait, and a fresh connection usually works. A timeout is not retried: Redis is
    frozen or unreachable and a retry would wait SYNTH_REDIS_TIMEOUT again. Should the
    first attempt have landed after all, the second message is refused at claim (the job
    is no longer queued)."""
    started = time.monotonic()
    try:
        return _send(task, capture, producer)
    except (redis.ConnectionError, OSError, KombuOperationalError) as exc:
        if not wire.quick_failure(exc, started):
            raise
    return _send(task, capture, producer)


def _send(task: Task, capture: CaptureProducer, producer: Any = None) -> Any:
    """One publish of the captured message: the call Celery would have made."""
    with (
        task.app.producer_or_acquire(producer) as real,
        real.connection._reraise_as_library_errors(),
    ):
        real.publish(capture.body, **(capture.publish_kwargs or {}))
    headers = capture.message()["headers"]
    result = task.AsyncResult(headers["id"])
    result.ignored = bool(headers.get("ignore_result"))  # Celery's: get() returns None
    return result


def publish_failed(task: Task, job_id: str, exc: BaseException) -> Any:
    """The publish of a queued job failed: tombstone its row and raise (see
    ``Ledger.tombstone_unpublished``), unless a worker already claimed the job, in
    which case it was published after all: then it is not reported as failed."""
    reason = f"publish failed: {type(exc).__name__}: {exc}"
    tombstoned: bool | None = None
    try:
        tombstoned = task.platform.ledger.tombstone_unpublished(job_id, reason[:1000])
    except Exception:
        # Postgres is out of reach too: the row stays queued and the reconciler
        # publishes it later. The caller still hears of the failure.
        log.exception("job %s: could not record that its publish failed", job_id)
    if tombstoned is False and isinstance(exc, Exception):
        return task.AsyncResult(job_id)
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError, ListenerTimeout)):
        # What Celery raises when it cannot publish.
        raise KombuOperationalError(str(exc)) from exc
    raise exc
