"""The enqueue API for application code.

``enqueue(task_name, payload, *, priority=, delay=, idempotency_key=, queue=, gpu=,
correlation_id=)`` validates
the payload against the task's model, refuses oversize payloads and unknown tasks with typed
errors (nothing is queued then), writes the job record, publishes the message and returns a
:class:`JobHandle`. Messages are JSON only. Without an idempotency key or a delay, the
record's ``INSERT`` and the publish overlap (``synth_workers.ledger.early``): enqueue returns
once both are done, and a message whose record Postgres refused is never run.

Refused before anything is written (``PayloadValidationError``; the checks live in
``synth_workers.validation`` and run in ``Task.apply_async``, that is ``synth_workers.publish``,
so Celery's ``delay`` and ``apply_async`` get them too): a payload that is not strict JSON
(NaN, Infinity, a string or key holding NUL or a lone surrogate; the message names the
value's path), an idempotency key that is not 1 to 255 printable characters, a delay that is
not finite, is negative or is over ``SYNTH_MAX_DELAY_SECONDS``.

**When the publish fails** (Redis refuses, resets, or does not answer within
``SYNTH_REDIS_TIMEOUT``) enqueue raises :class:`ServiceUnavailableError` within about that
timeout (Celery's publish retries are off; one immediate retry after a reset connection). The
job's ledger row is not deleted but made a tombstone: state ``cancelled``, ``last_error``
saying the publish failed, and its idempotency key freed, so a retry with the same key makes
a new job. A publish that timed out may still land once Redis answers; its message is then
refused at claim (the job is not queued) and never adopted as a job sent around the
platform. Should a worker have claimed the job before the tombstone was written, the publish
did succeed: enqueue returns its handle instead of raising. A job is never both run and
reported failed, as long as Postgres can record the tombstone.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import psycopg
import redis
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ValidationError

from synth_workers import routing
from synth_workers.errors import (
    JobCancelledError,
    JobFailedError,
    JobNotFoundError,
    JobTimeoutError,
    PayloadValidationError,
    ServiceUnavailableError,
    UnknownTaskError,
)
from synth_workers.publish import FRESH_ID_OPTION, ID_ONLY_OPTION, PLACEMENT_OPTION, placement
from synth_workers.settings import mask_url
from synth_workers.states import JobState
from synth_workers.task import Task

if TYPE_CHECKING:
    from synth_workers.app import SynthCelery
    from synth_workers.events import Event


def _default_app() -> SynthCelery:
    from synth_workers.app import app

    return app


def _unavailable(app: SynthCelery, exc: BaseException) -> ServiceUnavailableError:
    return ServiceUnavailableError(
        f"Redis is not reachable at {mask_url(app.settings.broker_url)} (REDIS_URL): "
        f"{' '.join(str(exc).split()).rstrip('.')}. "
        "Start one (`redis-server`, or `synth-workers dev` for the embedded stack) or set "
        "REDIS_URL."
    )


class JobHandle:
    """A job that was enqueued: its id, state, result, and cancellation."""

    def __init__(
        self, job_id: str, *, app: SynthCelery | None = None, deduplicated: bool = False
    ) -> None:
        self.id = job_id
        #: True when an idempotency key matched an existing job and nothing new was queued.
        self.deduplicated = deduplicated
        self._app = app or _default_app()

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"

    def info(self) -> dict[str, Any]:
        """The job's ledger row (state, attempt, error, timestamps, result, ...)."""
        row = self._app.ledger.get(self.id)
        if row is None:
            raise JobNotFoundError(self.id, f"no job {self.id} (never enqueued, or purged)")
        return row

    def state(self) -> JobState:
        return JobState(self.info()["state"])

    def wait(self, timeout: float | None = None, poll: float = 0.005) -> Any:
        """Block until the job is final; return its result or raise why it is not.

        Woken by the job's announcement on Celery's result channel (the job marked as
        waited on, as ``AsyncResult.get()`` marks it: ``synth_workers.announce``); the row
        is read again at least every ``poll`` seconds, growing to 0.5 s, should a notice be
        missed (Redis out of reach: polling alone)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        interval = poll
        with _Notices(self._app, self.id) as notices:
            while True:
                row = self.info()
                state = JobState(row["state"])
                if state is JobState.SUCCEEDED:
                    return row["result"]
                if state is JobState.DEAD:
                    raise JobFailedError(
                        self.id, row["error_class"] or "?", row["last_error"] or ""
                    )
                if state is JobState.CANCELLED:
                    raise JobCancelledError(self.id, f"job {self.id} was cancelled")
                if deadline is not None and time.monotonic() >= deadline:
                    raise JobTimeoutError(self.id, f"job {self.id} still {state} after {timeout}s")
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                notices.wait(interval if remaining is None else min(interval, remaining))
                interval = min(interval * 1.5, 0.5)

    def events(self, timeout: float | None = 60.0, since: str | None = None) -> Iterator[Event]:
        """The job's events in order, blocking for new ones: its whole history (after event
        id ``since`` when given), ending after its final event (succeeded, dead, cancelled).

        Raises :class:`JobTimeoutError` when the job has not ended within ``timeout`` seconds
        (``None``: wait for ever).
        """
        from synth_workers.events import subscribe

        subscription = subscribe(job_id=self.id, since=since, timeout=timeout, app=self._app)
        yield from subscription
        if subscription.timed_out:
            raise JobTimeoutError(self.id, f"job {self.id} did not end within {timeout}s")

    def cancel(self) -> bool:
        """Cancel the job; True when it will never start.

        Durable: a cancelled job never starts, even if no worker was up when it was
        cancelled. A running job is asked to stop (``Task.cancel_requested``) and False is
        returned; a finished job stays as it ended (False).
        """
        outcome = self._app.ledger.cancel(self.id)
        if outcome == "unknown":
            raise JobNotFoundError(self.id, f"no job {self.id} (never enqueued, or purged)")
        return outcome == "cancelled"


class _Notices:
    """The job's announcements on Celery's result channel, for :meth:`JobHandle.wait`: the
    first :meth:`wait` subscribes and marks the job waited on (its success is then
    announced), in that order, so a job that ends after the mark is announced to this
    subscription, and one that ended before it is read as ended. Without Redis (or on a
    failure) :meth:`wait` only sleeps: polling alone. A Redis that does not answer delays
    the first read after the mark by up to ``SYNTH_REDIS_TIMEOUT``."""

    def __init__(self, app: SynthCelery, job_id: str) -> None:
        self._app, self._job_id = app, job_id
        self._pubsub: Any = None
        self._ready = False

    def __enter__(self) -> _Notices:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                self._pubsub.close()

    def _subscribe(self) -> None:
        from synth_workers.ledger.results import mark_waited

        self._ready = True  # once: a failure leaves polling alone
        backend: Any = self._app.backend
        try:
            pubsub = backend.client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(backend.get_key_for_task(self._job_id))
        except Exception:  # no wake-up: Redis out of reach, or another backend
            return
        self._pubsub = pubsub
        mark_waited(self._app.ledger, [self._job_id])

    def wait(self, seconds: float) -> None:
        """Until an announcement comes or ``seconds`` pass (the first call subscribes, then
        returns at once: the row is read again after the mark)."""
        if not self._ready:
            self._subscribe()
            if self._pubsub is not None:
                return
        if self._pubsub is None:
            time.sleep(seconds)
            return
        try:
            self._pubsub.get_message(timeout=seconds)
        except (redis.RedisError, OSError):
            self.__exit__()  # its connection closed; polling alone from now on
            self._pubsub = None
            time.sleep(seconds)


def _lookup(app: SynthCelery, task_name: str) -> Task:
    if task_name not in app.tasks:
        app.loader.import_default_modules()
    task = app.tasks.get(task_name)
    if not isinstance(task, Task):
        raise UnknownTaskError(
            f"unknown task {task_name!r}: it is not registered on the app (add its module to "
            "SYNTH_INCLUDE or import it before enqueueing)"
        )
    return task


def _validated(task: Task, payload: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
    model = task.payload_model
    if isinstance(payload, BaseModel):
        if model is not None and not isinstance(payload, model):
            raise PayloadValidationError(
                f"{task.name} takes a {model.__name__}, got {type(payload).__name__}"
            )
        return payload.model_dump(mode="json")
    if not isinstance(payload, Mapping):
        raise PayloadValidationError(
            f"payload must be a mapping or a pydantic model, got {type(payload).__name__}"
        )
    if model is not None:
        try:
            return model.model_validate(payload).model_dump(mode="json")
        except ValidationError as exc:
            raise PayloadValidationError(f"{task.name}: invalid payload: {exc}") from exc
    data = dict(payload)
    header = getattr(task, "__header__", None)  # the run() signature, as Celery checks it
    if header is not None:
        try:
            header(**data)
        except TypeError as exc:
            raise PayloadValidationError(f"{task.name}: {exc}") from exc
    return data


def enqueue(
    task_name: str,
    payload: BaseModel | Mapping[str, Any] | None = None,
    *,
    priority: routing.Priority | None = None,
    delay: float | None = None,
    idempotency_key: str | None = None,
    queue: str | None = None,
    gpu: bool = False,
    conn: psycopg.Connection[Any] | None = None,
    job_id: str | None = None,
    user_id: str | None = None,
    correlation_id: str | None = None,
    deferrable: bool = False,
    app: SynthCelery | None = None,
) -> JobHandle:
    """Enqueue one job; return its handle once it is recorded and published.

    ``priority``: ``"high"``, ``"normal"`` (default), ``"low"`` or 0–9, bigger first.
    ``delay``: seconds before it may run. ``idempotency_key``: a second enqueue with the same
    key within ``SYNTH_IDEMPOTENCY_WINDOW`` returns the first job's handle and queues nothing.
    ``queue``: override the route; ``gpu=True``: an embedding job for a GPU worker.
    ``conn``: an open psycopg connection inside a transaction (outbox): the job is written
    in it and published only once it commits; a rollback leaves no job.
    ``user_id``: the user (tenant) the job belongs to: its events go to that user's stream
    and only that user may read them over SSE (see ``synth_workers.events``).
    ``correlation_id``: the caller's request id (default: the current one, see
    ``synth_workers.correlation``): carried by the job, its events, log lines and ledger
    row, and by the jobs it starts.
    ``deferrable``: an LLM call or OpenAI embedding the job makes may wait for the provider's
    batch API, at the batch price (``synth_workers.batchtier``); the job looks the same.
    Returns once the ledger row is committed (or written in ``conn``) and published.
    """
    app = app or _default_app()
    task = _lookup(app, task_name)
    # Priority and queue are resolved here, once, and handed over as they are.
    placed = placement(task, priority, queue, gpu=gpu)
    data = _validated(task, payload if payload is not None else {})

    fresh = job_id is None
    job_id = job_id or str(uuid.uuid4())
    # Task.apply_async (synth_workers.publish) checks payload (strict JSON and
    # SYNTH_MAX_PAYLOAD_BYTES, one serialization), idempotency key and delay before it
    # writes anything.
    options: dict[str, Any] = {"task_id": job_id, PLACEMENT_OPTION: placed, ID_ONLY_OPTION: True}
    if fresh:
        options[FRESH_ID_OPTION] = True
    if delay is not None and delay != 0:  # NaN is != 0: refused there
        options["countdown"] = delay
    if idempotency_key is not None:
        options["synth_idempotency_key"] = idempotency_key
    if conn is not None:
        options["synth_conn"] = conn
    if user_id is not None:
        options["synth_user_id"] = str(user_id)
    if correlation_id is not None:
        options["synth_correlation_id"] = correlation_id
    if deferrable:
        options["synth_deferrable"] = True
    try:
        result = task.apply_async(kwargs=data, **options)
    except (OperationalError, redis.RedisError, OSError) as exc:
        raise _unavailable(app, exc) from exc
    sent = result if isinstance(result, str) else result.id  # the overlapped send: its id
    return JobHandle(sent, app=app, deduplicated=sent != job_id)
