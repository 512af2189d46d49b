"""The platform's base Task: every task on the app gets this behaviour by default.

- **Job records**: a run first marks its job ``running`` (refused when the job was cancelled
  or already finished), then ``succeeded``, ``failed-retrying`` or ``dead``.
- **Payloads**: a task with ``payload_model`` gets its keyword arguments parsed into that
  pydantic model; a payload that does not parse is an :class:`InvalidPayloadError`
  (dead at once, never retried).
- **Retry policy** (per task, defaults from settings): ``max_attempts`` in total (3),
  exponential backoff with full jitter — attempt *n* waits a uniform random time in
  ``[0, min(cap, base * 2**(n-1))]``. ``PermanentError`` and payload validation errors are
  never retried; ``TransientError``, connection errors, timeouts and any other exception are.
  Narrow it per task with ``retry_for=(...)``.
- **Priorities** use the platform's scale (``synth_workers.routing``): ``apply_async(priority=
  "high")`` and ``priority=8`` mean the same thing everywhere, retries keep their level.
- **Delivery**: late acks and reject-on-worker-lost, so a job whose worker dies is redelivered.
"""

from __future__ import annotations

import random
import time
import traceback
import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar

import celery
from celery.exceptions import Ignore, Reject, Retry
from pydantic import BaseModel, ValidationError

from synth_workers.errors import InvalidPayloadError, PermanentError
from synth_workers.jobstate import JobState
from synth_workers.routing import (
    from_transport,
    queue_for_task,
    resolve_priority,
    to_transport,
)

if TYPE_CHECKING:
    from celery.canvas import Signature

    from synth_workers.app import SynthCelery

_CONTROL_FLOW = (Retry, Ignore, Reject)


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


def _eta(options: dict[str, Any]) -> float | None:
    countdown = options.get("countdown")
    if countdown:
        return time.time() + float(countdown)
    eta = options.get("eta")
    if isinstance(eta, datetime):
        return eta.timestamp()
    if isinstance(eta, str):
        return datetime.fromisoformat(eta).timestamp()
    return None


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

    # --- sending ----------------------------------------------------------------------------
    def apply_async(  # type: ignore[override]
        self, args: Any = None, kwargs: Any = None, **options: Any
    ) -> Any:
        """Celery's ``apply_async`` on the platform's priority scale, writing the job record.

        Every job gets its record here, however it was sent (``enqueue``, ``delay``, beat,
        canvas), so ``JobHandle(result.id)`` works for all of them. A retry re-sends a job
        that already has one.
        """
        level = options.pop("priority", None)
        if level is None:
            level = self.priority
        level = resolve_priority(level)
        options["priority"] = to_transport(level)
        idempotency_key: str | None = options.pop("synth_idempotency_key", None)
        if options.get("retries"):
            return super().apply_async(args, kwargs, **options)
        job_id: str = options.setdefault("task_id", None) or str(uuid.uuid4())
        options["task_id"] = job_id
        jobs = self.synth_app.jobs
        jobs.create(
            job_id,
            task=self.name,
            queue=_queue_name(options.get("queue") or getattr(self, "queue", None))
            or queue_for_task(self.name),
            priority=level,
            eta=_eta(options),
            idempotency_key=idempotency_key,
        )
        try:
            return super().apply_async(args, kwargs, **options)
        except BaseException:
            jobs.delete(job_id)
            raise

    def signature_from_request(self, *args: Any, **kwargs: Any) -> Signature[Any]:
        sig: Signature[Any] = super().signature_from_request(*args, **kwargs)
        transport = sig.options.get("priority")
        if transport is not None:  # back to our scale; apply_async converts again
            sig.options["priority"] = from_transport(int(transport))
        return sig

    # --- running ----------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.id is None:
            return self._invoke(args, kwargs)
        job_id: str = request.id
        attempt = int(request.retries or 0) + 1
        jobs = self.synth_app.jobs
        before = jobs.start(job_id, attempt)
        if before in (JobState.CANCELLED, JobState.SUCCEEDED, JobState.DEAD):
            raise Ignore(f"job {job_id} is {before}; not run")
        try:
            result = self._invoke(args, kwargs)
        except _CONTROL_FLOW:
            raise
        except (PermanentError, ValidationError) as exc:
            jobs.dead(job_id, type(exc).__name__, str(exc), traceback.format_exc())
            raise
        except self.retry_for as exc:
            limit = self.max_attempts or self.synth_app.settings.max_attempts
            if attempt >= limit:
                jobs.dead(job_id, type(exc).__name__, str(exc), traceback.format_exc())
                raise
            settings = self.synth_app.settings
            wait = full_jitter_backoff(
                attempt,
                self.backoff_base or settings.retry_backoff_base,
                self.backoff_cap or settings.retry_backoff_cap,
            )
            jobs.retrying(job_id, exc, wait)
            raise self.retry(exc=exc, countdown=wait, max_retries=limit - 1) from exc
        except BaseException as exc:
            jobs.dead(job_id, type(exc).__name__, str(exc), traceback.format_exc())
            raise
        jobs.succeed(job_id, result)
        return result

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
