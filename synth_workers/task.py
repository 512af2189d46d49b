"""The platform's base Task: every task on the app gets this behaviour by default.

- **Ledger first.** Sending a job writes its ledger row (committed) before the message is
  published; a delayed job is only a row until the sweeper promotes it. Running a job first
  *claims* its row (refused when the job is not queued: taken, finished or cancelled), then
  finishes it fenced by the claim's attempt and lease: a late finish is refused and recorded.
- **Payloads**: a task with ``payload_model`` gets its keyword arguments parsed into that
  pydantic model; any other task's arguments are bound to its ``run`` signature and checked
  against its annotations (``synth_workers.binding``). A payload that does not parse or bind
  is an :class:`InvalidPayloadError`: dead at once (failure class ``invalid_payload``).
- **Retries.** A task that sets any of Celery's retry options (``max_retries``,
  ``default_retry_delay``, ``autoretry_for``, ``dont_autoretry_for``, ``retry_kwargs``,
  ``retry_backoff``, ``retry_backoff_max``, ``retry_jitter``) retries as Celery documents:
  only through ``self.retry()`` or ``autoretry_for``, ``max_retries`` counts retries
  (``None``: no limit), ``request.retries`` is 0, 1, 2... and the last refusal raises the
  ``exc`` given or ``MaxRetriesExceededError`` (the job is dead, ``link_error`` fires). A
  task that sets none gets the platform's policy (per task, defaults from settings):
  ``max_attempts`` in total (3), exponential backoff with full jitter — attempt *n* waits a
  uniform random time in ``[0, min(cap, base * 2**(n-1))]``; ``PermanentError`` and payload
  validation errors are never retried; ``TransientError``, connection errors, timeouts and
  any other exception are (narrow it with ``retry_for=(...)``); ``self.retry(countdown=)``
  sets the wait, ``self.retry(max_retries=)`` switches to Celery's rule. Either way the wait
  is kept in the ledger (``failed-retrying`` + ``run_at``), not in worker memory, so no
  visibility timeout can run a retry twice, and the ledger counts ``retries`` (worker losses
  are not retries).
- **The message is the job.** Sending builds the Celery message once (Celery's own
  ``apply_async``, on a capturing producer: ``synth_workers.message``), writes it with the
  row, then publishes it; every re-publish sends that message with only the id, retries,
  eta and routing changed, so chain, ``link``, ``link_error`` and chord survive.
- **Priorities** use the platform's scale (``synth_workers.routing``): ``apply_async(priority=
  "high")`` and ``priority=8`` mean the same thing everywhere.
- **Effects**: ``with self.effect_transaction() as conn:`` commits the job's own writes
  together with its completion (exactly once); ``self.effect_done(key)`` /
  ``self.record_effect(key)`` guard an outside effect (an email) against a second run.
- **Cancellation**: ``self.cancel_requested`` turns true when someone cancels the running
  job; ``self.raise_if_cancelled()`` stops it there.
- **Progress**: ``self.progress(current, total, message=...)`` emits a ``progress`` event
  (``synth_workers.events``); ``self.workflow_completed(**summary)`` a ``workflow_completed``.
"""

from __future__ import annotations

import logging
import math
import random
import socket
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import celery
import psycopg
import redis
from billiard.exceptions import Terminated, WorkerLostError
from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from celery.worker.request import Request as CeleryRequest
from kombu.exceptions import OperationalError as KombuOperationalError
from pydantic import BaseModel, ValidationError

from synth_workers import outbox
from synth_workers.binding import Binding
from synth_workers.errors import (
    InvalidPayloadError,
    PayloadTooLargeError,
    PayloadValidationError,
    PermanentError,
    RateLimitedError,
    SynthWorkersError,
)
from synth_workers.ledger.store import Publishable
from synth_workers.ledger.transport import publish
from synth_workers.lifecycle import ListenerTimeout
from synth_workers.message import CaptureProducer, from_request
from synth_workers.platform import platform_of
from synth_workers.routing import (
    DEFAULT_PRIORITY,
    MAX_PRIORITY,
    MIN_PRIORITY,
    foreign_priority,
    from_transport,
    queue_for_task,
    resolve_priority,
    to_transport,
)
from synth_workers.validation import check_delay, check_idempotency_key, eta_delay, payload_size

if TYPE_CHECKING:
    from synth_workers.app import SynthCelery
    from synth_workers.ledger.store import Claim
    from synth_workers.platform import Platform

_CONTROL_FLOW = (Retry, Reject)

log = logging.getLogger(__name__)


class LeaseLostError(SynthWorkersError):
    """This worker no longer holds the job (its lease expired and another took it)."""


class CancelledWhileRunning(SynthWorkersError):  # noqa: N818 - a request, not a failure
    """Raised by ``raise_if_cancelled()`` when the running job was cancelled."""


class _RetryRequested(Retry):
    """``self.retry()`` in a claimed job: the retry decision is the runner's, the wait the
    ledger's. A :class:`celery.exceptions.Retry`, so that Celery's ``autoretry_for`` wrapper
    lets it through like its own."""

    def __init__(
        self,
        exc: BaseException | None,
        countdown: float | None,
        eta: Any = None,
        max_retries: int | None = None,
    ) -> None:
        super().__init__("retry requested", None, countdown)  # type: ignore[arg-type]
        self.cause = exc
        self.countdown = countdown
        self.eta = eta
        self.max_retries = max_retries


#: Celery's retry options: a task that sets any of them retries as Celery documents
#: (``max_retries``, ``default_retry_delay``, ...); one that sets none gets the platform's
#: policy (``max_attempts``, full-jitter backoff, ``retry_for``).
CELERY_RETRY_OPTIONS = (
    "max_retries",
    "default_retry_delay",
    "autoretry_for",
    "dont_autoretry_for",
    "retry_kwargs",
    "retry_backoff",
    "retry_backoff_max",
    "retry_jitter",
)


class _DeferRequested(Exception):  # noqa: N818 - control flow
    def __init__(self, countdown: float, reason: str, capped: bool) -> None:
        super().__init__(f"deferred {countdown:.2f}s: {reason}")
        self.countdown = countdown
        self.reason = reason
        self.capped = capped


def backoff_bound(attempt: int, base: float, cap: float) -> float:
    """Upper bound of the wait after failed attempt ``attempt`` (1-based)."""
    return float(min(cap, base * (2 ** max(0, attempt - 1))))


def full_jitter_backoff(
    attempt: int, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait after failed attempt ``attempt``: uniform in ``[0, bound]``."""
    return (rng or random).uniform(0.0, backoff_bound(attempt, base, cap))


def _queue_name(queue: Any) -> str | None:
    if queue is None or isinstance(queue, str):
        return queue
    return str(getattr(queue, "name", queue))


def _delay(options: dict[str, Any], limit: float) -> float | None:
    """Seconds the job waits (``countdown=`` or ``eta=``), checked against ``limit``."""
    countdown = options.pop("countdown", None)
    eta = options.pop("eta", None)
    if countdown is not None and countdown != 0:  # NaN is != 0: refused by the check
        return check_delay(countdown, limit)
    if eta is not None:
        return eta_delay(eta, limit)
    return None


def _expires_at(expires: Any) -> datetime | None:
    """Celery's ``expires=`` (seconds from now, a datetime, or an ISO 8601 string) as the
    moment the ledger stores; a naive datetime is UTC (the app's timezone)."""
    if expires is None:
        return None
    if isinstance(expires, str):
        try:
            expires = datetime.fromisoformat(expires)
        except ValueError:
            raise PayloadValidationError(
                f"expires is not an ISO 8601 date and time: {expires!r}"
            ) from None
    if isinstance(expires, datetime):
        return expires if expires.tzinfo else expires.replace(tzinfo=UTC)
    if isinstance(expires, bool) or not isinstance(expires, (int, float)):
        raise PayloadValidationError(
            f"expires must be seconds, a datetime or an ISO 8601 string, got "
            f"{type(expires).__name__}"
        )
    if not math.isfinite(expires):
        raise PayloadValidationError(f"expires must be a finite number of seconds: {expires!r}")
    return datetime.now(UTC) + timedelta(seconds=max(-1e9, min(float(expires), 1e9)))


#: A publish that failed faster than this (a reset or refused socket, not a timeout) is
#: retried once at once.
QUICK_FAILURE_SECONDS = 0.5


def _timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a timeout."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (redis.TimeoutError, TimeoutError, ListenerTimeout)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Request(CeleryRequest):
    """Celery's Request, telling the ledger when a job's process died or was killed.

    ``delivery_info['priority']`` is on the platform's scale (0-9, bigger first: see
    ``synth_workers.routing``), not kombu's, so a task sees the level it was sent with and
    a child it sends with that priority keeps it. A message without one is ``normal``.
    The raw value stays in ``properties['priority']``.
    """

    def __init__(self, message: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(message, *args, **kwargs)
        info = self.delivery_info
        transport = info.get("priority")
        if isinstance(transport, int) and not isinstance(transport, bool):
            info["priority"] = from_transport(max(MIN_PRIORITY, min(transport, MAX_PRIORITY)))
        else:
            info["priority"] = DEFAULT_PRIORITY

    def _owner_prefix(self) -> str:
        """Lease owners of the pool process that ran this request (see LeaseKeeper)."""
        return f"{socket.gethostname()}:{self.worker_pid}:"

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if not soft:
            platform_of(self.task.app).ledger.hard_timeout(
                self.id, f"hard time limit ({timeout}s) exceeded", self._owner_prefix()
            )
        super().on_timeout(soft, timeout)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        if isinstance(exc_info.exception, (WorkerLostError, Terminated)):
            # before the message is requeued; only if that process still holds the job (a
            # job revoked with terminate=True ends cancelled there)
            platform_of(self.task.app).ledger.worker_lost(self.id, self._owner_prefix())
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


class Task(celery.Task):  # type: ignore[type-arg]
    """Base class of every task registered on the platform's app."""

    #: Parse the job's keyword arguments into this model and call ``run(payload)``.
    payload_model: ClassVar[type[BaseModel] | None] = None
    #: Attempts in total; ``None`` takes ``SYNTH_MAX_ATTEMPTS``.
    max_attempts: int | None = None
    #: Backoff base and cap in seconds; ``None`` takes the settings.
    backoff_base: float | None = None
    backoff_cap: float | None = None
    #: Exceptions that retry (minus ``PermanentError`` and ``ValidationError``, which never do).
    retry_for: tuple[type[Exception], ...] = (Exception,)

    Request = "synth_workers.task:Request"
    #: Expected refusals: Celery logs them in one line, without a traceback (the ledger
    #: keeps it).
    throws: tuple[type[Exception], ...] = (InvalidPayloadError,)
    acks_late = True
    reject_on_worker_lost = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("payload_model") is not None:
            # The payload model checks arguments, not run()'s signature.
            cls.typing = False

    @property
    def synth_app(self) -> SynthCelery:
        return self.app  # type: ignore[return-value]

    @property
    def platform(self) -> Platform:
        """The platform state of this task's app (``install(app)`` stored it)."""
        return platform_of(self.app)

    # --- sending ----------------------------------------------------------------------------
    def apply_async(  # type: ignore[override]
        self, args: Any = None, kwargs: Any = None, **options: Any
    ) -> Any:
        """Write the job's ledger row, then publish it (unless delayed or transactional).

        ``synth_conn=`` (an open psycopg connection in a transaction) makes it an outbox
        enqueue: the row is written in that transaction and published once it commits.
        ``synth_idempotency_key=`` dedupes: the existing job's result handle is returned.
        ``synth_user_id=``: the user (tenant) the job belongs to (its events are theirs).

        Before anything is written, the payload (strict JSON), the idempotency key and the
        delay are checked (``synth_workers.validation``). A failed publish leaves a
        tombstone, never a queued row (see :meth:`_publish_failed`).
        """
        settings = self.platform.settings
        dump_models = getattr(self, "_dump_pydantic_arguments", None)
        if dump_models is not None and options.get("serializer") != "pickle":
            # Celery's ``pydantic=True``: models the caller passes are sent as their dumps
            args, kwargs = dump_models(args, kwargs)
        level = options.pop("priority", None)
        level = resolve_priority(self.priority if level is None else level)
        conn: psycopg.Connection[Any] | None = options.pop("synth_conn", None) or outbox.current()
        key: str | None = options.pop("synth_idempotency_key", None)
        user_id: str | None = options.pop("synth_user_id", None)
        # Refusals first: nothing is written to Postgres or Redis before these pass.
        if key is not None:
            check_idempotency_key(key)
        delay = _delay(options, settings.max_delay_seconds)
        size = payload_size(args, kwargs)
        cap = settings.max_payload_bytes
        if size > cap:
            raise PayloadTooLargeError(
                f"{self.name}: payload is {size} bytes, over the {cap}-byte cap "
                "(SYNTH_MAX_PAYLOAD_BYTES); store large inputs elsewhere and pass a reference"
            )
        job_id: str = options.get("task_id") or str(uuid.uuid4())
        options["task_id"] = job_id
        queue = _queue_name(options.get("queue") or getattr(self, "queue", None))
        if queue is None and self.platform.routes_by_kind:  # the platform's own app
            queue = options["queue"] = queue_for_task(self.name)
        ledger = self.platform.ledger
        row: dict[str, Any] = {
            "job_id": job_id,
            "task": self.name,
            # None: Celery's router decides (an adopted app's routes), read from the message
            "queue": queue,
            "priority": level,
            "payload": dict(kwargs or {}),
            "args": list(args) if args else None,
            "delay": delay,
            "idempotency_key": key,
            "max_attempts": self.max_attempts,
            "published": conn is None,
            "user_id": user_id,
            "expires_at": _expires_at(options.get("expires")),
        }
        options["priority"] = to_transport(level)
        eager = bool(self.app.conf.task_always_eager)
        if not eager:  # the message, built by Celery, is stored with the row (one INSERT)
            capture = self._message(args, kwargs, options)
            row["message"] = capture.message()
            if queue is None:
                row["queue"] = capture.queue()
        if row["queue"] is None:
            row["queue"] = self.app.conf.task_default_queue
        if conn is not None:
            actual = ledger.insert_job(conn, **row)
            return self.AsyncResult(actual)
        if key is None and ledger.durable_commits:
            # One statement in autocommit: a single round trip (no BEGIN/COMMIT).
            with ledger.connection() as own:
                actual = ledger.insert_job(own, **row)
        else:  # the key's upsert and the row commit together; durable in worker processes
            with ledger.connection() as own, own.transaction():
                actual = ledger.insert_job(own, **row)
        if actual == job_id and ledger.lifecycle.listening:
            try:
                ledger.lifecycle.announce(
                    "scheduled" if delay else "queued",
                    job_id,
                    task=self.name,
                    queue=row["queue"],
                    user_id=user_id,
                    data={"priority": level, "delay": delay} if delay else {"priority": level},
                    # The event went to the broker's Redis and it did not answer within
                    # SYNTH_REDIS_TIMEOUT: publishing would wait for it as long again.
                    raise_timeouts=not delay,
                )
            except ListenerTimeout as exc:
                return self._publish_failed(job_id, exc)
        if actual != job_id or delay:
            return self.AsyncResult(actual)
        if eager:
            return super().apply_async(args, kwargs, **options)
        try:
            return self._publish(capture, options.get("producer"))
        except BaseException as exc:
            return self._publish_failed(job_id, exc)

    def _message(self, args: Any, kwargs: Any, options: dict[str, Any]) -> CaptureProducer:
        """Celery's own ``apply_async`` builds and routes the message (canvas, ids, expires,
        time limits, stamps: everything Celery puts in it) on a :class:`CaptureProducer`,
        which keeps it instead of sending it (``synth_workers.message``). Celery's
        ``before_task_publish``/``after_task_publish`` signals fire here, once per send."""
        capture = CaptureProducer()
        super().apply_async(args, kwargs, **{**options, "producer": capture})
        if not capture.captured:
            raise RuntimeError(f"{self.name}: Celery built no message to send")
        return capture

    def _publish(self, capture: CaptureProducer, producer: Any = None) -> Any:
        """Send the captured message (Celery's own publish retries are off: see
        ``celery_config``), retried once at once when it failed fast with a connection
        error: a socket Redis reset or closed (restarted, failed over) fails before any
        wait, and a fresh connection usually works. A timeout is not retried: Redis is
        frozen or unreachable and a retry would wait SYNTH_REDIS_TIMEOUT again. Should the
        first attempt have landed after all, the second message is refused at claim (the job
        is no longer queued)."""
        started = time.monotonic()
        try:
            return self._send(capture, producer)
        except (redis.ConnectionError, OSError, KombuOperationalError) as exc:
            if _timed_out(exc) or time.monotonic() - started > QUICK_FAILURE_SECONDS:
                raise
        return self._send(capture, producer)

    def _send(self, capture: CaptureProducer, producer: Any = None) -> Any:
        """One publish of the captured message: the call Celery would have made."""
        with (
            self.app.producer_or_acquire(producer) as real,
            real.connection._reraise_as_library_errors(),
        ):
            real.publish(capture.body, **(capture.publish_kwargs or {}))
        headers = capture.message()["headers"]
        result = self.AsyncResult(headers["id"])
        result.ignored = bool(headers.get("ignore_result"))  # Celery's: get() returns None
        return result

    def _publish_failed(self, job_id: str, exc: BaseException) -> Any:
        """The publish of a queued job failed: tombstone its row and raise (see
        :meth:`Ledger.tombstone_unpublished`), unless a worker already claimed the job, in
        which case it was published after all: then it is not reported as failed."""
        reason = f"publish failed: {type(exc).__name__}: {exc}"
        tombstoned: bool | None = None
        try:
            tombstoned = self.platform.ledger.tombstone_unpublished(job_id, reason[:1000])
        except Exception:
            # Postgres is out of reach too: the row stays queued and the reconciler
            # publishes it later. The caller still hears of the failure.
            log.exception("job %s: could not record that its publish failed", job_id)
        if tombstoned is False and isinstance(exc, Exception):
            return self.AsyncResult(job_id)
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError, ListenerTimeout)):
            # What Celery raises when it cannot publish.
            raise KombuOperationalError(str(exc)) from exc
        raise exc

    def retry(
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: Any = None,
        throw: bool = True,
        eta: Any = None,
        countdown: Any = None,
        max_retries: Any = None,
        **options: Any,
    ) -> Any:
        """Celery's ``self.retry()``, kept durable: the wait goes to the ledger (the job's
        row turns ``failed-retrying`` with a ``run_at``; the sweeper re-sends its message
        when due), never to worker memory. ``max_retries``, ``countdown``, ``eta`` and
        ``default_retry_delay`` mean what Celery says (see :meth:`_celery_retry`); a task
        that sets none of Celery's retry options and passes no ``max_retries`` keeps the
        platform's attempt budget. ``args``/``kwargs`` changes are not supported: the job
        runs again with its own."""
        if self.request.called_directly or self.claim is None:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        raise _RetryRequested(exc, countdown, eta, max_retries)

    @classmethod
    def uses_celery_retries(cls) -> bool:
        """Whether the task sets any of Celery's retry options (``CELERY_RETRY_OPTIONS``)
        itself, rather than inheriting Celery's defaults."""
        for klass in cls.__mro__:
            if klass is Task:
                return False
            if any(name in klass.__dict__ for name in CELERY_RETRY_OPTIONS):
                return True
        return False

    def defer(
        self, countdown: float, reason: str = "rate_limited", *, capped: bool = True
    ) -> NoReturn:
        """Run this job again in ``countdown`` seconds *without using an attempt* (a shared
        rate limit or a provider's 429 said wait). The wait is kept in the ledger.

        ``capped`` (the default, for a provider's 429): a job keeps deferring for at most
        ``SYNTH_DEFER_MAX_SECONDS`` since its first capped deferral; after that the 429 is a
        failed attempt (failure class ``rate_limited``), retried after ``countdown`` and
        dead-lettered when attempts run out, so a provider that answers 429 forever does not
        hold the job forever. ``capped=False`` for waits on the platform's own shared limits,
        which a backlog may make long but which always free up.
        """
        if self.claim is None:
            raise RateLimitedError(f"deferred: {reason}", retry_after=countdown)
        raise _DeferRequested(max(0.0, float(countdown)), reason, capped)

    # --- running ----------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.id is None or request.is_eager:
            # Celery runs it here and now (``apply()``, eager mode): no message, no ledger.
            return self._invoke(args, kwargs)
        app = self.platform
        keeper = app.lease_keeper
        completer = app.completer
        finished = completer.take()
        try:
            claim = app.ledger.claim(request.id, keeper.owner, complete=finished)
        except BaseException:
            completer.write(finished)
            raise
        completer.written(finished)
        if claim is None and app.ledger.get(request.id) is None:
            # Sent around the platform (Celery's send_task, another producer): adopt it,
            # its message kept whole (canvas, ids, retries) for any re-publish.
            self._adopt(request, args, kwargs)
            claim = app.ledger.claim(request.id, keeper.owner)
        if claim is None:
            raise Ignore(f"job {request.id} is not queued; not run")
        request.synth_claim = claim  # type: ignore[attr-defined]
        request.synth_finished = False  # type: ignore[attr-defined]
        keeper.add(claim.job_id)
        handed_over = False
        try:
            result = self._run_claimed(claim, args, kwargs)
            if not getattr(request, "synth_finished", False):
                # Written by the completer, batched, while the next job runs; the lease is
                # renewed until then.
                app.completer.submit(claim, result)
                handed_over = True
            return result
        finally:
            if not handed_over:
                keeper.remove(claim.job_id)

    def _adopt(self, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Give a ledger row to a message sent around the platform. One sent without a
        priority (kombu files it as 0, its most urgent list, ahead of ``high``) is recorded
        ``normal`` and re-filed on the normal list instead of run now (:class:`Ignore`), so
        that it does not jump the queue; it runs when its turn comes."""
        app = self.app
        raw = (request.properties or {}).get("priority")
        level = foreign_priority(raw)
        info = request.delivery_info if request.delivery_info is not None else {}
        info["priority"] = level  # what the ledger records, not kombu's 0
        job = Publishable(
            request.id,
            self.name,
            str(info.get("routing_key") or queue_for_task(self.name)),
            level,
            dict(kwargs),
            list(args) or None,
            message=from_request(request),
            retries=int(request.retries or 0),
        )
        adopted = self.platform.ledger.adopt(
            job.id,
            job.task,
            job.queue,
            job.priority,
            job.payload,
            job.args,
            message=job.message,
            retries=job.retries,
        )
        if adopted and not (isinstance(raw, int) and raw > 0):
            publish(app, [job])
            raise Ignore(f"job {request.id} was sent without a priority: re-filed as normal")

    def _run_claimed(self, claim: Claim, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        ledger = self.platform.ledger
        try:
            if self.payload_model is None:
                self._binding().check(args, kwargs)
            result = self._invoke(args, kwargs)
        except _RetryRequested as wanted:
            return self._celery_retry(claim, wanted)
        except _DeferRequested as wanted:
            cap = self.platform.settings.defer_max_seconds
            limit = cap if wanted.capped else None
            if ledger.defer(claim, wanted.countdown, wanted.reason, limit) == "exhausted":
                error = RateLimitedError(
                    f"{wanted.reason}: still rate limited after deferring for more than "
                    f"{cap:g}s (SYNTH_DEFER_MAX_SECONDS)",
                    retry_after=wanted.countdown,
                )
                return self._retry_or_die(claim, error, "rate_limited", wanted.countdown)
            raise Retry(when=wanted.countdown) from None  # type: ignore[arg-type]
        except _CONTROL_FLOW:
            raise
        except LeaseLostError:
            # Another worker owns the job now; its outcome is theirs to record.
            raise Ignore(f"job {claim.job_id}: lease lost, outcome refused") from None
        except Ignore:
            if not getattr(self.request, "synth_replaced", False):
                ledger.succeed(claim, None)
            raise
        except CancelledWhileRunning:
            ledger.cancelled_while_running(claim)
            raise Ignore(f"job {claim.job_id} cancelled while running") from None
        except InvalidPayloadError as exc:  # the payload can never bind: no retry
            ledger.dead(
                claim, "invalid_payload", type(exc).__name__, str(exc), traceback.format_exc()
            )
            raise
        except (PermanentError, ValidationError) as exc:
            ledger.dead(claim, "exception", type(exc).__name__, str(exc), traceback.format_exc())
            raise
        except SoftTimeLimitExceeded as exc:
            return self._retry_or_die(claim, exc, "soft_timeout", None)
        except (SystemExit, KeyboardInterrupt):
            # The process is being stopped under the job (a signal to the pool process):
            # not the job's failure. The worker's main process reports the lost process
            # (requeue, counted toward the poison-pill limit), else the lease expires.
            raise
        except self.retry_for as exc:
            if self.uses_celery_retries():  # Celery: only self.retry()/autoretry_for retry
                ledger.dead(
                    claim, "exception", type(exc).__name__, str(exc), traceback.format_exc()
                )
                raise
            return self._retry_or_die(claim, exc, "exception", None)
        except BaseException as exc:
            ledger.dead(claim, "exception", type(exc).__name__, str(exc), traceback.format_exc())
            raise
        return result

    def _retry_or_die(
        self, claim: Claim, exc: BaseException, failure_class: str, countdown: float | None
    ) -> Any:
        settings = self.platform.settings
        limit = self.max_attempts or settings.max_attempts
        if claim.attempt >= limit:
            self.platform.ledger.dead(
                claim, failure_class, type(exc).__name__, str(exc), traceback.format_exc()
            )
            raise exc
        wait = (
            countdown
            if countdown is not None
            else full_jitter_backoff(
                claim.attempt,
                self.backoff_base or settings.retry_backoff_base,
                self.backoff_cap or settings.retry_backoff_cap,
            )
        )
        self.platform.ledger.retry_later(claim, wait, exc, failure_class)
        raise Retry(exc=exc if isinstance(exc, Exception) else None, when=wait)  # type: ignore[arg-type]

    def _celery_retry(self, claim: Claim, wanted: _RetryRequested) -> Any:
        """``self.retry()`` (or ``autoretry_for``) asked for another run, decided as Celery's
        ``Task.retry`` decides: ``request.retries + 1`` over ``max_retries`` (the call's, else
        the task's; ``None`` is unlimited) raises ``exc`` or ``MaxRetriesExceededError`` and
        the job is dead; else it waits ``countdown``, until ``eta``, or
        ``default_retry_delay``. A task that sets none of Celery's retry options and passes
        no ``max_retries`` keeps the platform's policy (:meth:`_retry_or_die`)."""
        settings = self.platform.settings
        error = wanted.cause if isinstance(wanted.cause, BaseException) else None
        delay: float | None = wanted.countdown
        if wanted.eta is not None:
            delay = eta_delay(wanted.eta, settings.max_delay_seconds)
        if wanted.max_retries is None and not self.uses_celery_retries():
            return self._retry_or_die(claim, error or Exception("retry"), "exception", delay)
        limit = self.max_retries if wanted.max_retries is None else wanted.max_retries
        retries = int(self.request.retries or 0) + 1
        if limit is not None and retries > limit:
            if error is None:
                error = self.MaxRetriesExceededError(
                    f"Can't retry {self.name}[{claim.job_id}] args:{self.request.args} "
                    f"kwargs:{self.request.kwargs}"
                )
            self.platform.ledger.dead(
                claim, "exception", type(error).__name__, str(error), traceback.format_exc()
            )
            raise error
        if delay is None:
            delay = float(self.default_retry_delay or 0)
        reason = error if error is not None else Retry("retry requested")
        self.platform.ledger.retry_later(claim, delay, reason, "exception")
        exc = error if isinstance(error, Exception) else None
        raise Retry(exc=exc, when=delay)  # type: ignore[arg-type]

    def _binding(self) -> Binding:
        binding: Binding | None = self.__dict__.get("_synth_binding")
        if binding is None:
            binding = self.__dict__["_synth_binding"] = Binding(self.name, self.run)
        return binding

    def _invoke(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        model = self.payload_model
        if model is None:
            return self.run(*args, **kwargs)
        if args:
            raise InvalidPayloadError(
                f"{self.name} takes its payload as keyword arguments, got positional {args!r}"
            )
        try:
            payload = model.model_validate(kwargs)
        except ValidationError as exc:
            raise InvalidPayloadError(f"{self.name}: invalid payload: {exc}") from exc
        return self.run(payload)

    def on_replace(self, sig: Any) -> Any:
        """Celery's ``self.replace(sig)``: the replacement inherits this job's id (Celery
        freezes its last task with it). The job's row is held first (waiting, never due, no
        lease: ``Ledger.hold_for_replacement``), so that neither the reaper nor this
        attempt's outcome touches it; the replacement's send re-opens it with its own message.
        """
        claim = self.claim
        if claim is not None and not self.request.is_eager:
            self.platform.ledger.hold_for_replacement(claim)
            self.request.synth_replaced = True  # type: ignore[attr-defined]
        return super().on_replace(sig)

    # --- helpers for task code --------------------------------------------------------------
    @property
    def claim(self) -> Claim | None:
        """The running job's claim (id, attempt, owner); ``None`` outside a worker."""
        return getattr(self.request, "synth_claim", None)

    @contextmanager
    def effect_transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """A ledger transaction that commits the job's writes *with* its completion.

        If this worker lost the job (lease expired, another took it) nothing commits and
        :class:`LeaseLostError` is raised: the effect happens exactly once.
        """
        claim = self.claim
        if claim is None:
            raise RuntimeError("effect_transaction() needs a job run by a worker")
        ledger = self.platform.ledger
        with ledger.connection() as conn:
            with conn.transaction():
                ledger.durable(conn)
                # Hold the job's row while the effect is written: the claim is checked first,
                # and no reaper can take the job back until this commits or rolls back.
                if not ledger.lock_claim(conn, claim):
                    ledger.record_late(claim, "effect")
                    raise LeaseLostError(f"job {claim.job_id} attempt {claim.attempt} lost")
                yield conn
                if not ledger.succeed(claim, None, conn=conn):
                    raise LeaseLostError(f"job {claim.job_id} attempt {claim.attempt} lost")
            self.request.synth_finished = True  # type: ignore[attr-defined]
            ledger.announce_finish(claim, "succeeded")

    def effect_done(self, key: str) -> bool:
        """Whether this job already recorded the effect ``key`` (in any earlier run)."""
        claim = self.claim
        return claim is not None and self.platform.ledger.effect_recorded(claim.job_id, key)

    def record_effect(self, key: str, detail: Any = None) -> bool:
        """Record that effect ``key`` happened; False when it was already recorded."""
        claim = self.claim
        if claim is None:
            return True
        return self.platform.ledger.record_effect(claim.job_id, key, detail)

    @property
    def cancel_requested(self) -> bool:
        claim = self.claim
        return claim is not None and self.platform.lease_keeper.cancel_requested(claim.job_id)

    def raise_if_cancelled(self) -> None:
        if self.cancel_requested:
            raise CancelledWhileRunning(f"job {self.request.id} was cancelled")

    # --- events (synth_workers.events) --------------------------------------------------------
    def progress(
        self, current: float, total: float | None = None, message: str | None = None
    ) -> None:
        """Report the running job's progress: a ``progress`` event (buffered and written in
        batches by the worker's event writer; nothing outside a worker or with events off)."""
        data: dict[str, Any] = {"current": current, "total": total}
        if message is not None:
            data["message"] = message[:500]
        self._announce("progress", data)

    def workflow_completed(self, **summary: Any) -> None:
        """Tell subscribers this workflow finished its work (``summary``: small JSON)."""
        self._announce("workflow_completed", summary)

    def _announce(self, kind: str, data: dict[str, Any]) -> None:
        claim = self.claim
        ledger = self.platform.ledger
        if claim is not None and ledger.lifecycle.listening:
            ledger.lifecycle.announce(kind, claim.job_id, **ledger.about(claim), data=data)
