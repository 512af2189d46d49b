"""Celery's worker Consumer, dead-lettering the messages it refuses.

A message in another serialization (pickle included), one that does not decode, or one
naming a task this worker does not know is never executed: Celery logs and drops it, and
this consumer also records it in the ledger as a dead job with failure class
``rejected_message`` (payload: the raw body, truncated), so it is counted and visible in the
DLQ.
"""

from __future__ import annotations

import base64
import logging
from typing import TYPE_CHECKING, Any, cast

from celery.worker.consumer import Consumer as CeleryConsumer

if TYPE_CHECKING:
    from synth_workers.app import SynthCelery

log = logging.getLogger(__name__)


def _describe(message: Any) -> tuple[str | None, str, str, str]:
    headers = getattr(message, "headers", None) or {}
    info = getattr(message, "delivery_info", None) or {}
    body = getattr(message, "body", b"")
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogateescape")
    try:
        raw = body.decode("utf-8")
        if "\x00" in raw:
            raise ValueError("NUL")
    except ValueError:
        raw = "base64:" + base64.b64encode(body).decode()
    return (
        headers.get("id"),
        str(headers.get("task") or "?"),
        str(info.get("routing_key") or "?"),
        raw,
    )


class Consumer(CeleryConsumer):
    def _dead_letter(self, message: Any, reason: str, exc: BaseException | None) -> None:
        job_id, task, queue, raw = _describe(message)
        try:
            content_type = getattr(message, "content_type", "?")
            cast("SynthCelery", self.app).ledger.record_rejected(
                job_id, task, queue, raw, reason, f"{content_type}: {exc!r}"
            )
        except Exception:
            log.exception("could not dead-letter a rejected message")

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self._dead_letter(message, "DecodeError", exc)
        super().on_decode_error(message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._dead_letter(message, "UnknownTask", exc)
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        self._dead_letter(message, type(exc).__name__, exc)
        super().on_invalid_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self._dead_letter(message, "UnknownMessage", None)
        super().on_unknown_message(body, message)
