"""The platform's base Task: every task on the app gets this behaviour by default.

The Task is an adapter: ``apply_async`` hands sending to ``synth_workers.publish``, a worker's
call hands running (claim, lease, completion, the retry decision) to ``synth_workers.runner``.

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
  job; ``self.raise_if_cancelled()`` stops it there. ``self.stop_requested`` is also true
  once the worker could not renew the job's lease in time (cut off from Postgres:
  ``synth_workers.selffence``); ``raise_if_cancelled()`` then raises ``SelfFencedError``
  and the job is not cancelled but runs again elsewhere.
- **Progress**: ``self.progress(current, total, message=...)`` emits a ``progress`` event
  (``synth_workers.events``); ``self.workflow_completed(**summary)`` a ``workflow_completed``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import celery
import psycopg
from celery.worker.request import Request as CeleryRequest
from pydantic import BaseModel, ValidationError

from synth_workers import runner
from synth_workers.binding import Binding
from synth_workers.errors import InvalidPayloadError, RateLimitedError
from synth_workers.platform import platform_of
from synth_workers.poolwatch import process_lost
from synth_workers.publish import send
from synth_workers.routing import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY, from_transport
from synth_workers.runner import CancelledWhileRunning, LeaseLostError
from synth_workers.selffence import SelfFencedError
from synth_workers.states import EventKind

if TYPE_CHECKING:
    from synth_workers.app import SynthCelery
    from synth_workers.ledger.store import Claim
    from synth_workers.platform import Platform


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
        lost_in_batch = getattr(self, "synth_lost_in_batch", False)  # batched/dispatch.py
        if process_lost(exc_info) and not lost_in_batch:
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
        tombstone, never a queued row (``synth_workers.publish``).
        """
        return send(self, args, kwargs, options, super().apply_async)

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
        ``default_retry_delay`` mean what Celery says (see
        :func:`synth_workers.runner.celery_retry`); a task that sets none of Celery's retry
        options and passes no ``max_retries`` keeps the platform's attempt budget.
        ``args``/``kwargs`` change the next run's arguments as in Celery (kept in the
        ledger row), ``expires`` its expiry."""
        if self.request.called_directly or self.claim is None:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)
        arguments = runner.retry_arguments(self, self.request, args, kwargs)
        expires = options.get("expires")
        raise runner.RetryRequested(exc, countdown, eta, max_retries, arguments, expires)

    @classmethod
    def uses_celery_retries(cls) -> bool:
        """Whether the task sets any of Celery's retry options (``CELERY_RETRY_OPTIONS``)
        itself, rather than inheriting Celery's defaults."""
        return runner.uses_celery_retries(cls, Task)

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
        raise runner.DeferRequested(max(0.0, float(countdown)), reason, capped)

    # --- running ----------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        if request.called_directly or request.id is None or request.is_eager:
            # Celery runs it here and now (``apply()``, eager mode): no message, no ledger.
            return self._invoke(args, kwargs)
        return runner.run(self, request.id, args, kwargs)

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
            ledger.announce_finish(claim, EventKind.SUCCEEDED)

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

    @property
    def stop_requested(self) -> bool:
        """Cancelled, or self-fenced: the job should stop (see ``raise_if_cancelled``)."""
        claim = self.claim
        return claim is not None and (
            self.platform.lease_keeper.fenced(claim.job_id) or self.cancel_requested
        )

    def raise_if_cancelled(self) -> None:
        """Stop here if the job was cancelled (:class:`CancelledWhileRunning`: it ends
        cancelled) or its lease could not be renewed in time (``SelfFencedError``: nothing is
        recorded, the reaper runs it again on another worker)."""
        claim = self.claim
        if claim is not None and self.platform.lease_keeper.fenced(claim.job_id):
            raise SelfFencedError(
                f"job {claim.job_id} attempt {claim.attempt}: lease not renewed in time "
                "(this worker is cut off from the ledger); stopped"
            )
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
        self._announce(EventKind.PROGRESS, data)

    def workflow_completed(self, **summary: Any) -> None:
        """Tell subscribers this workflow finished its work (``summary``: small JSON)."""
        self._announce(EventKind.WORKFLOW_COMPLETED, summary)

    def _announce(self, kind: EventKind, data: dict[str, Any]) -> None:
        claim = self.claim
        ledger = self.platform.ledger
        if claim is not None and ledger.lifecycle.listening:
            ledger.lifecycle.announce(kind, claim.job_id, **ledger.about(claim), data=data)
