"""Job lifecycle announcements: the one place every change of a job's state is told.

The ledger (``synth_workers.ledger.store``) records each state change; right after a change
commits it emits a :class:`JobEvent` here. In-process listeners — Redis Streams events,
Prometheus metrics, per-job log lines — connect to the app's :class:`Lifecycle` (wired by
the app factory, never at import time) instead of each patching the task's code paths.

Event kinds (``JobEvent.kind``):

====================  ===================================================================
``queued``            the job can run now: enqueued, promoted when due, published from the
                      outbox, or requeued after its worker was lost (``data["reason"]``)
``scheduled``         enqueued with a delay: it waits in the ledger
``started``           a worker claimed it (``attempt`` is the new attempt;
                      ``data["queue_wait"]``: seconds since it was enqueued)
``progress``          the running task reported progress (``current``, ``total``, ``message``)
``retrying``          the attempt failed and another one is due (``failure_class``,
                      ``error_class``, ``delay``)
``succeeded``         finished (``data["runtime"]``: seconds the attempt ran, when known)
``dead``              dead-lettered (``failure_class``, ``error_class``)
``cancelled``         cancelled before it started, or stopped on request while running
``late_refused``      a worker that lost its lease tried to finish it; refused (``outcome``)
====================  ===================================================================

Announced by ``tasks.orchestration`` (facts about work, not job states; never final):
``workflow_completed`` — an AI workflow's aggregate committed (``job_id`` is the workflow
id; ``data``: ``documents``, ``provider``, ``model``, ``input_tokens``, ``output_tokens``,
``credits``, ``aggregate_job``); ``usage`` — an LLM job's usage committed (``data``:
``provider``, ``model``, ``input_tokens``, ``output_tokens``, ``credits``, ``workflow_id``),
what ``synth_llm_tokens_total`` and ``synth_credits_charged_total`` count.

Listeners run in the emitting thread: they must be cheap, and an exception in one is logged
and never reaches the job. One exception: a listener whose service did not answer in time
raises :class:`ListenerTimeout`, which reaches an announcer that asked for it
(``announce(..., raise_timeouts=True)``: an enqueue about to publish to the same Redis stops
there instead of waiting for it a second time).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from synth_workers.states import EventKind

log = logging.getLogger(__name__)

#: Every event kind (see :class:`synth_workers.states.EventKind`).
KINDS = tuple(EventKind)


@dataclass(frozen=True, slots=True)
class JobEvent:
    """Something that happened to one job."""

    kind: str
    job_id: str
    task: str | None = None
    queue: str | None = None
    attempt: int | None = None
    user_id: str | None = None
    #: The caller's request id (``synth_workers.correlation``), when the announcer knows it.
    correlation_id: str | None = None
    #: Unix time of the change.
    at: float = field(default_factory=time.time)
    data: Mapping[str, Any] = field(default_factory=dict)


Listener = Callable[[JobEvent], None]


class ListenerTimeout(Exception):  # noqa: N818 - a signal between listener and announcer
    """A listener's service did not answer within its timeout (the listener kept the work to
    finish later). Reaches the announcer only with ``raise_timeouts=True``."""


class Lifecycle:
    """Fans each :class:`JobEvent` out to the connected listeners, in connection order."""

    def __init__(self) -> None:
        self._listeners: tuple[Listener, ...] = ()
        self._lock = threading.Lock()

    def connect(self, listener: Listener) -> Listener:
        with self._lock:
            if listener not in self._listeners:
                self._listeners = (*self._listeners, listener)
        return listener

    def disconnect(self, listener: Listener) -> None:
        with self._lock:
            self._listeners = tuple(f for f in self._listeners if f != listener)

    @property
    def listening(self) -> bool:
        return bool(self._listeners)

    @property
    def listeners(self) -> tuple[Listener, ...]:
        """The connected listeners, in connection order."""
        return self._listeners

    def emit(self, event: JobEvent, raise_timeouts: bool = False) -> None:
        """Tell every listener; with ``raise_timeouts``, raise the first
        :class:`ListenerTimeout` once all of them were told."""
        timed_out: ListenerTimeout | None = None
        for listener in self._listeners:
            try:
                listener(event)
            except ListenerTimeout as exc:
                if not raise_timeouts:
                    log.exception("lifecycle listener %r failed on %s", listener, event.kind)
                timed_out = timed_out or exc
            except Exception:
                log.exception("lifecycle listener %r failed on %s", listener, event.kind)
        if raise_timeouts and timed_out is not None:
            raise timed_out

    def announce(
        self, kind: str, job_id: str, *, raise_timeouts: bool = False, **fields: Any
    ) -> None:
        """Build and emit an event; skipped entirely when nobody listens."""
        if self._listeners:
            data = fields.pop("data", None) or {}
            self.emit(JobEvent(kind, job_id, data=data, **fields), raise_timeouts)
