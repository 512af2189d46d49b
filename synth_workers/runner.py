"""Running one claimed job: claim, lease keeping, the task body's exception mapping,
completion and the retry decision. ``Task.__call__`` hands every worker run to :func:`run`.

- **Claim first.** The job's ledger row is claimed (refused when it is not queued: taken,
  finished or cancelled) in the same statement that completes this process's previous jobs
  (``ledger.completer``). A message sent around the platform (Celery's ``send_task``, another
  producer) has no row: it is adopted, its message kept whole, then claimed
  (``synth_workers.unrecorded``, which also takes a message published before its row).
- **Lease.** The job stays in the process's :class:`~synth_workers.ledger.lease.LeaseKeeper`
  from claim until its completion is written, so its lease is renewed throughout.
- **Completion** is fenced by the claim's attempt: a success is handed to the completer
  (batched with the next claim); a failure is written here, as ``dead`` or
  ``failed-retrying`` with a ``run_at`` (the wait is the ledger's, not the worker's).
- **The retry decision.** A task that sets any of Celery's retry options
  (:data:`CELERY_RETRY_OPTIONS`) retries as Celery documents, only through ``self.retry()``
  or ``autoretry_for`` (:func:`celery_retry`); one that sets none gets the platform's policy
  (:func:`retry_or_die`): ``max_attempts`` in total, full-jitter exponential backoff
  (:func:`full_jitter_backoff`), ``PermanentError`` and payload errors never retried.
"""

from __future__ import annotations

import inspect
import random
import traceback
from typing import TYPE_CHECKING, Any

from celery.exceptions import Ignore, Reject, Retry, SoftTimeLimitExceeded
from pydantic import ValidationError

from synth_workers import tracing, unrecorded
from synth_workers.batched import child as batched
from synth_workers.errors import (
    InvalidPayloadError,
    PermanentError,
    RateLimitedError,
    SynthWorkersError,
)
from synth_workers.selffence import SelfFencedError
from synth_workers.states import FailureClass
from synth_workers.validation import eta_delay, expires_at

if TYPE_CHECKING:
    from synth_workers.ledger.store import Claim
    from synth_workers.task import Task

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


class LeaseLostError(SynthWorkersError):
    """This worker no longer holds the job (its lease expired and another took it)."""


class CancelledWhileRunning(SynthWorkersError):  # noqa: N818 - a request, not a failure
    """Raised by ``raise_if_cancelled()`` when the running job was cancelled."""


class RetryRequested(Retry):
    """``self.retry()`` in a claimed job: the retry decision is the runner's, the wait the
    ledger's. A :class:`celery.exceptions.Retry`, so that Celery's ``autoretry_for`` wrapper
    lets it through like its own."""

    def __init__(
        self,
        exc: BaseException | None,
        countdown: float | None,
        eta: Any = None,
        max_retries: int | None = None,
        arguments: tuple[list[Any], dict[str, Any]] | None = None,
        expires: Any = None,
    ) -> None:
        super().__init__("retry requested", None, countdown)  # type: ignore[arg-type]
        self.cause = exc
        self.countdown = countdown
        self.eta = eta
        self.max_retries = max_retries
        #: The next run's (args, kwargs) when ``self.retry(args=, kwargs=)`` changed them.
        self.arguments = arguments
        #: ``self.retry(expires=)``: the next run's ``expires`` (seconds or a datetime).
        self.expires = expires


def retry_arguments(
    task: Task, request: Any, args: Any, kwargs: Any
) -> tuple[list[Any], dict[str, Any]] | None:
    """The arguments of the next run for ``self.retry(args=, kwargs=)``, as Celery's
    ``Task.retry`` computes them: a value not given is the request's, and inherited values
    that conflict with the new calling convention are dropped (an argument now given by
    position leaves the inherited keywords; a keyword replaces an inherited positional
    argument). ``None`` when neither is given."""
    if args is None and kwargs is None:
        return None
    old_args = list(request.args or ())
    old_kwargs = dict(request.kwargs or {})
    if args is not None and kwargs is None and old_kwargs:
        kwargs = dict(old_kwargs)
        try:
            params = inspect.signature(task.run).parameters.values()
        except (TypeError, ValueError):
            params = None
        if params is not None:
            positional = [p for p in params if p.kind in _POSITIONAL]
            for p in positional[: len(args)]:
                if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
                    kwargs.pop(p.name, None)
    elif kwargs is not None and args is None and old_args:
        try:
            signature = inspect.signature(task.run)
            bound = signature.bind_partial(*old_args)
        except (TypeError, ValueError):
            pass
        else:
            kwargs = dict(kwargs)
            for name in list(kwargs):
                if (
                    name in bound.arguments
                    and signature.parameters[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
                ):
                    bound.arguments[name] = kwargs.pop(name)
            args, kwargs = bound.args, {**bound.kwargs, **kwargs}
    new_args = old_args if args is None else list(args)
    new_kwargs = old_kwargs if kwargs is None else dict(kwargs)
    return new_args, new_kwargs


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class DeferRequested(Exception):  # noqa: N818 - control flow
    """``self.defer()`` in a claimed job: run again later without using an attempt."""

    def __init__(self, countdown: float, reason: str, capped: bool) -> None:
        super().__init__(f"deferred {countdown:.2f}s: {reason}")
        self.countdown = countdown
        self.reason = reason
        self.capped = capped


class ParkedInBatch(Exception):  # noqa: N818 - control flow
    """The job's request went to the batch tier (``synth_workers.batchtier``): its row stays
    running, parked, until the result is written back and the job runs again to read it."""


def backoff_bound(attempt: int, base: float, cap: float) -> float:
    """Upper bound of the wait after failed attempt ``attempt`` (1-based)."""
    return float(min(cap, base * (2 ** max(0, attempt - 1))))


def full_jitter_backoff(
    attempt: int, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait after failed attempt ``attempt``: uniform in ``[0, bound]``."""
    return (rng or random).uniform(0.0, backoff_bound(attempt, base, cap))


def uses_celery_retries(cls: type, base: type) -> bool:
    """Whether task class ``cls`` sets any of Celery's retry options itself, below the
    platform's base class ``base``, rather than inheriting Celery's defaults."""
    for klass in cls.__mro__:
        if klass is base:
            return False
        if any(name in klass.__dict__ for name in CELERY_RETRY_OPTIONS):
            return True
    return False


def run(task: Task, job_id: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run delivered job ``job_id`` of ``task`` (its current request): claim, run, complete
    or retry (see above)."""
    request = task.request
    platform = task.platform
    keeper = platform.lease_keeper
    completer = platform.completer
    # The batched mode: claimed with its batch, its lease kept from that claim.
    claim = batched.take(platform, job_id)
    from_batch = claim is not None
    sent = None if from_batch else keeper.before_claim()  # waits while cut off (selffence)
    finished = [] if from_batch else completer.take()
    try:
        with tracing.span("synth.ledger.claim", job_id=job_id, task=task.name):
            claim = claim or platform.claims.claim(job_id, keeper.owner, complete=finished)
    except BaseException:
        completer.write(finished)
        raise
    completer.written(finished)
    if claim is None:
        # no row: sent around the platform (adopted), or published before its row commits
        claim = unrecorded.take(task, request, args, kwargs, keeper.owner)
    if claim is None:
        raise Ignore(f"job {job_id} is not queued; not run")
    request.synth_claim = claim  # type: ignore[attr-defined]
    request.synth_finished = False  # type: ignore[attr-defined]
    if not from_batch:
        keeper.add(claim.job_id, since=sent)
    handed_over = False
    try:
        result = _run_claimed(task, claim, args, kwargs)
        if not getattr(request, "synth_finished", False):
            # Written by the completer, batched, while the next job runs; the lease is
            # renewed until then.
            platform.completer.submit(claim, result)
            handed_over = True
        return result
    finally:
        if not handed_over:
            keeper.remove(claim.job_id)


def _dead(task: Task, claim: Claim, failure_class: FailureClass, exc: BaseException) -> None:
    task.platform.ledger.dead(
        claim, failure_class, type(exc).__name__, str(exc), traceback.format_exc(), exc=exc
    )


def _run_claimed(task: Task, claim: Claim, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run the task body and map what it raised to the job's outcome."""
    ledger = task.platform.ledger
    try:
        if task.payload_model is None:
            task._binding().check(args, kwargs)
        result = task._invoke(args, kwargs)
    except RetryRequested as wanted:
        return celery_retry(task, claim, wanted)
    except DeferRequested as wanted:
        cap = task.platform.settings.defer_max_seconds
        limit = cap if wanted.capped else None
        if ledger.defer(claim, wanted.countdown, wanted.reason, limit) == "exhausted":
            error = RateLimitedError(
                f"{wanted.reason}: still rate limited after deferring for more than "
                f"{cap:g}s (SYNTH_DEFER_MAX_SECONDS)",
                retry_after=wanted.countdown,
            )
            return retry_or_die(task, claim, error, FailureClass.RATE_LIMITED, wanted.countdown)
        raise Retry(when=wanted.countdown) from None  # type: ignore[arg-type]
    except Retry:
        raise
    except ParkedInBatch:
        raise Ignore(f"job {claim.job_id} waits in the batch tier") from None
    except Reject as exc:
        # Celery's Reject: requeued, the job is queued again for its redelivery; else it
        # ends as Celery records it, a FAILURE (raising the Reject).
        if getattr(exc, "requeue", False):
            task.platform.ledger.requeue_rejected(claim)
        else:
            _dead(task, claim, FailureClass.EXCEPTION, exc)
        raise
    except (LeaseLostError, SelfFencedError):
        # Another worker owns the job now (or will: this one could not renew the lease and
        # stopped the job, see selffence); its outcome is theirs to record.
        raise Ignore(f"job {claim.job_id}: lease lost, outcome refused") from None
    except Ignore:
        if not getattr(task.request, "synth_replaced", False):
            ledger.succeed(claim, None)
        raise
    except CancelledWhileRunning:
        ledger.cancelled_while_running(claim)
        raise Ignore(f"job {claim.job_id} cancelled while running") from None
    except InvalidPayloadError as exc:  # the payload can never bind: no retry
        _dead(task, claim, FailureClass.INVALID_PAYLOAD, exc)
        raise
    except (PermanentError, ValidationError) as exc:
        _dead(task, claim, FailureClass.EXCEPTION, exc)
        raise
    except SoftTimeLimitExceeded as exc:
        return retry_or_die(task, claim, exc, FailureClass.SOFT_TIMEOUT, None)
    except (SystemExit, KeyboardInterrupt):
        # The process is being stopped under the job (a signal to the pool process):
        # not the job's failure. The worker's main process reports the lost process
        # (requeue, counted toward the poison-pill limit), else the lease expires.
        raise
    except task.retry_for as exc:
        if task.uses_celery_retries():  # Celery: only self.retry()/autoretry_for retry
            _dead(task, claim, FailureClass.EXCEPTION, exc)
            raise
        return retry_or_die(task, claim, exc, FailureClass.EXCEPTION, None)
    except BaseException as exc:
        _dead(task, claim, FailureClass.EXCEPTION, exc)
        raise
    return result


def retry_or_die(
    task: Task,
    claim: Claim,
    exc: BaseException,
    failure_class: FailureClass,
    countdown: float | None,
) -> Any:
    """The platform's policy: dead once ``max_attempts`` are used, else retried after
    ``countdown`` or a full-jitter backoff (always raises)."""
    settings = task.platform.settings
    limit = task.max_attempts or settings.max_attempts
    if claim.attempt >= limit:
        _dead(task, claim, failure_class, exc)
        raise exc
    wait = (
        countdown
        if countdown is not None
        else full_jitter_backoff(
            claim.attempt,
            task.backoff_base or settings.retry_backoff_base,
            task.backoff_cap or settings.retry_backoff_cap,
        )
    )
    task.platform.ledger.retry_later(claim, wait, exc, failure_class)
    raise Retry(exc=exc if isinstance(exc, Exception) else None, when=wait)  # type: ignore[arg-type]


def celery_retry(task: Task, claim: Claim, wanted: RetryRequested) -> Any:
    """``self.retry()`` (or ``autoretry_for``) asked for another run, decided as Celery's
    ``Task.retry`` decides: ``request.retries + 1`` over ``max_retries`` (the call's, else
    the task's; ``None`` is unlimited) raises ``exc`` or ``MaxRetriesExceededError`` and
    the job is dead; else it waits ``countdown``, until ``eta``, or
    ``default_retry_delay``. A task that sets none of Celery's retry options and passes
    no ``max_retries`` keeps the platform's policy (:func:`retry_or_die`)."""
    settings = task.platform.settings
    error = wanted.cause if isinstance(wanted.cause, BaseException) else None
    delay: float | None = wanted.countdown
    if wanted.eta is not None:
        delay = eta_delay(wanted.eta, settings.max_delay_seconds)
    if wanted.max_retries is None and not task.uses_celery_retries():
        return retry_or_die(task, claim, error or Exception("retry"), FailureClass.EXCEPTION, delay)
    limit = task.max_retries if wanted.max_retries is None else wanted.max_retries
    retries = int(task.request.retries or 0) + 1
    if limit is not None and retries > limit:
        if error is None:
            error = task.MaxRetriesExceededError(
                f"Can't retry {task.name}[{claim.job_id}] args:{task.request.args} "
                f"kwargs:{task.request.kwargs}"
            )
        _dead(task, claim, FailureClass.EXCEPTION, error)
        raise error
    if delay is None:
        delay = float(task.default_retry_delay or 0)
    reason = error if error is not None else Retry("retry requested")
    task.platform.ledger.retry_later(
        claim,
        delay,
        reason,
        FailureClass.EXCEPTION,
        arguments=wanted.arguments,
        expires_at=expires_at(wanted.expires),
    )
    exc = error if isinstance(error, Exception) else None
    raise Retry(exc=exc, when=delay)  # type: ignore[arg-type]
