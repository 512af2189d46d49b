"""Celery's worker Consumer, screening every message before Celery builds a request from it.

Each message either runs or is dead-lettered (``synth_workers.screening`` lists the reasons):
a refused message is recorded in the ledger as a dead job with failure class
``rejected_message`` (payload: the message's first bytes), counted in
``synth_rejected_messages_total{reason}``, and acknowledged: never put back on a queue, never
the cause of a worker's exit. An expired message ends its job ``cancelled``; a message with an
``eta`` (sent around the platform) is handed to the ledger, which holds it until it is due
instead of worker memory.

Refusals are written in batches by a background thread (``synth_workers.ledger.refusals``):
a flood of bad messages costs the consuming loop the screening alone, and while Postgres is
unreachable they are kept and retried.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.exceptions import ContentDisallowed

from synth_workers.batched.dispatch import BatchDispatcher
from synth_workers.correlation import of_headers
from synth_workers.errors import ServiceUnavailableError
from synth_workers.ledger.refusals import Refusal, RefusalWriter
from synth_workers.message import from_kombu
from synth_workers.platform import platform_of
from synth_workers.routing import foreign_priority
from synth_workers.screening import Limits, Refused, TaskMessage, check_task_message, stored_text

if TYPE_CHECKING:
    from synth_workers.platform import Platform

log = logging.getLogger(__name__)


def _queue_of(message: Any) -> str:
    info = getattr(message, "delivery_info", None) or {}
    return str(info.get("routing_key") or "?")


class Consumer(CeleryConsumer):
    def __init__(self, on_task_request: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(on_task_request, *args, **kwargs)
        #: The batched mode (``synth_workers.batched``): the pool calls of a batch's
        #: requests are sent as one.
        self.batcher: BatchDispatcher | None = None
        if self.platform.settings.worker_mode == "batched":
            self.batcher = BatchDispatcher(self, self.platform, on_task_request)
            self.on_task_request = self.batcher.on_task_request

    @property
    def platform(self) -> Platform:
        return platform_of(self.app)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        celery_handler = super().create_task_handler(*args, **kwargs)
        limits = Limits.from_settings(self.platform.settings)
        strategies = self.strategies  # type: ignore[attr-defined]

        def on_task_received(message: Any) -> Any:
            batch = getattr(message, "synth_batch", None)
            if batch is None or self.batcher is None:
                return screened(message)
            self.batcher.begin()  # batched mode: one pool call per batch
            try:
                return screened(message)
            finally:
                if batch.last:
                    self.batcher.flush()

        def screened(message: Any) -> Any:
            refused = getattr(message, "synth_refused", None)
            if refused is not None:
                return self.refuse(
                    message,
                    refused["reason"],
                    refused["detail"],
                    refused["raw"],
                    job_id=refused.get("id"),
                    task=refused.get("task"),
                )
            try:
                checked = check_task_message(message, strategies, limits)
            except Refused as exc:
                return self.refuse(message, exc.reason, exc.detail)
            except Exception as exc:  # a screening bug must not stop the worker either
                log.exception("screening failed")
                return self.refuse(message, "protocol", f"{type(exc).__name__}: {exc}")
            try:
                if checked.expires is not None and checked.expires <= datetime.now(UTC):
                    return self._expired(message, checked)
                if (
                    checked.eta is not None
                    and checked.eta > datetime.now(UTC)
                    and self._to_ledger(message, checked)
                ):
                    return None
                return celery_handler(message)
            except Exception as exc:
                if message.acknowledged:  # handed over already: nothing left to refuse
                    log.exception("error after a message was taken")
                    return None
                # Celery could not build a request from a message that passed screening.
                log.warning("Celery refused a screened message", exc_info=True)
                return self.refuse(message, "protocol", f"{type(exc).__name__}: {exc}")

        return on_task_received

    # --- outcomes ---------------------------------------------------------------------------
    def refuse(
        self,
        message: Any,
        reason: str,
        detail: str,
        raw: str | None = None,
        *,
        job_id: str | None = None,
        task: str | None = None,
    ) -> None:
        """Acknowledge ``message`` and hand it to the refusal writer, which dead-letters it
        (failure class ``rejected_message``) in its next batch."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        job_id = job_id or headers.get("id")
        task = task or headers.get("task")
        message.ack()
        self.refusals.add(
            Refusal(
                job_id if isinstance(job_id, str) else None,
                task if isinstance(task, str) else "?",
                _queue_of(message),
                stored_text(message.body or b"") if raw is None else raw,
                reason,
                detail,
            )
        )

    @property
    def refusals(self) -> RefusalWriter:
        writer: RefusalWriter | None = self.__dict__.get("_synth_refusals")
        if writer is None:
            writer = self.__dict__["_synth_refusals"] = RefusalWriter(self.platform.ledger)
        return writer

    def shutdown(self) -> None:
        super().shutdown()
        if "_synth_refusals" in self.__dict__ and not self.refusals.flush():
            log.error("refused messages not recorded at shutdown: the ledger is unreachable")

    def _expired(self, message: Any, checked: TaskMessage) -> None:
        expires = checked.expires.isoformat() if checked.expires else "?"
        try:
            outcome = self.platform.ledger.expire(
                checked.id,
                checked.task,
                _queue_of(message),
                stored_text(message.body or b""),
                f"expired at {expires} before it started",
            )
        except ServiceUnavailableError:
            message.reject(requeue=True)
            return
        log.info("job %s expired at %s: %s", checked.id, expires, outcome)
        message.ack()

    def _to_ledger(self, message: Any, checked: TaskMessage) -> bool:
        """A message with an ``eta``: the ledger holds the job until it is due, its message
        kept whole (canvas, ids, retries) for the publish then. Returns ``False`` when the
        ledger already holds the job: the platform sent it, due, with the time it was due as
        its ``eta``, which this host's clock may see a little ahead; Celery runs it."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        retries = headers.get("retries")
        try:
            adopted = self.platform.ledger.adopt(
                checked.id,
                checked.task,
                _queue_of(message),
                foreign_priority(message.properties.get("priority")),
                checked.kwargs,
                checked.args or None,
                run_at=checked.eta,
                message=from_kombu(message),
                retries=retries if isinstance(retries, int) and retries >= 0 else 0,
                correlation_id=of_headers(headers),
            )
        except ServiceUnavailableError:
            message.reject(requeue=True)
            return True
        if not adopted:
            return False
        message.ack()
        return True

    # --- Celery's own refusals (kept as a second line behind the screening) --------------------
    def on_decode_error(self, message: Any, exc: Exception) -> None:
        reason = "content_type" if isinstance(exc, ContentDisallowed) else "body"
        self.refuse(message, reason, f"{type(exc).__name__}: {exc}")

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        self.refuse(message, "unknown_task", f"{type(exc).__name__}: {exc}")

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self.refuse(message, "header", f"{type(exc).__name__}: {exc}")

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.refuse(message, "header", "not a task message")
