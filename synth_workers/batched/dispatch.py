"""The main process's side of a batch: Celery builds a ``Request`` for each message of the
batch as usual; their pool calls are collected here and sent to one pool process as one
call (:func:`.child.run_batch`), whose results are handed back to each request.

A request with a time limit (the pool enforces limits per call) or marked
:data:`~synth_workers.batched.ALONE_HEADER` goes to the pool alone, as in the default mode.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from billiard.exceptions import WorkerLostError
from celery.exceptions import TaskRevokedError
from celery.worker.request import Request as CeleryRequest

from synth_workers.batched import ALONE_HEADER
from synth_workers.batched.child import Failed, run_batch
from synth_workers.ledger.batchclaim import lost_batch
from synth_workers.poolwatch import exception_of

if TYPE_CHECKING:
    from synth_workers.platform import Platform

log = logging.getLogger(__name__)


@dataclass
class Call:
    """One request's pool call, as ``Request.execute_using_pool`` made it."""

    request: Any
    target: Callable[..., Any]
    args: tuple[Any, ...]
    on_accepted: Callable[..., Any]
    on_success: Callable[..., Any]
    on_failure: Callable[..., Any]


def runs_alone(request: Any) -> bool:
    """Whether ``request`` must be its own pool call: a time limit, or marked alone."""
    task = request.task
    headers = getattr(request, "_request_dict", None) or {}
    return bool(
        any(request.time_limits)
        or task.time_limit
        or task.soft_time_limit
        or headers.get(ALONE_HEADER)
    )


class BatchDispatcher:
    """Stands between Celery's strategy and its pool while a batch is delivered."""

    def __init__(self, consumer: Any, platform: Platform, forward: Callable[[Any], Any]) -> None:
        self.consumer = consumer
        self.platform = platform
        #: Celery's own ``on_task_request`` (the pool semaphore, then the pool).
        self.forward = forward
        self._calls: list[Call] | None = None
        self._request: Any = None

    # --- the consumer's hooks --------------------------------------------------------------
    def begin(self) -> None:
        """A batch's first message arrives: collect the pool calls until :meth:`flush`."""
        if self._calls is None:
            self._calls = []

    def on_task_request(self, request: Any) -> None:
        """Celery's strategy hands a request over (replaces ``consumer.on_task_request``)."""
        if self._calls is None or runs_alone(request):
            self.forward(request)
            return
        self._request = request
        try:
            # Celery's own method: the request class Celery builds per task binds the pool
            # it was made with; this one takes the pool it is given (this collector).
            CeleryRequest.execute_using_pool(request, self)  # type: ignore[arg-type]
        except TaskRevokedError:
            pass  # Celery's own handling (WorkController._process_task) does the same
        finally:
            self._request = None

    def apply_async(self, target: Callable[..., Any], args: Any = (), **options: Any) -> None:
        """``Request.execute_using_pool`` calls this as it would call the pool."""
        assert self._calls is not None and self._request is not None
        self._calls.append(
            Call(
                self._request,
                target,
                tuple(args),
                options["accept_callback"],
                options["callback"],
                options["error_callback"],
            )
        )

    def flush(self) -> None:
        """The batch's last message was handled: send what was collected, as one call."""
        calls, self._calls = self._calls or [], None
        if not calls:
            return
        pool = self.consumer.pool
        batch = _Sent(calls, self.platform)
        pool.apply_async(
            run_batch,
            args=([(c.target, c.args) for c in calls],),
            accept_callback=batch.accepted,
            callback=batch.done,
            error_callback=batch.failed,
            soft_timeout=None,
            timeout=None,
        )


class _Sent:
    """One batch sent to the pool: its callbacks fan out to each request's."""

    def __init__(self, calls: list[Call], platform: Platform) -> None:
        self.calls = calls
        self.platform = platform
        self.pid: int | None = None

    def accepted(self, pid: int, time_accepted: float) -> None:
        self.pid = pid
        for call in self.calls:
            _safely(call.on_accepted, pid, time_accepted)

    def done(self, results: list[Any], **kwargs: Any) -> None:
        for call, result in zip(self.calls, results, strict=True):
            if isinstance(result, Failed):
                _safely(call.on_failure, result.einfo)
            else:
                _safely(call.on_success, result)

    def failed(self, einfo: Any, **kwargs: Any) -> None:
        """The batch's pool process died (or the call failed): with more than one job, the
        jobs it held go back to the queue without a worker loss, their messages marked to
        run alone next time; Celery then requeues them (``reject_on_worker_lost``)."""
        if len(self.calls) > 1 and isinstance(exception_of(einfo), WorkerLostError):
            self._lost()
        for call in self.calls:
            _safely(call.on_failure, einfo)

    def _lost(self) -> None:
        for call in self.calls:
            call.request.synth_lost_in_batch = True
            headers = getattr(call.request, "_message", None)
            headers = getattr(headers, "headers", None)
            if isinstance(headers, dict):
                headers[ALONE_HEADER] = True  # kept in the requeued message
        pid = self.pid
        if pid is None:
            return  # never started: nothing claimed
        prefix = f"{socket.gethostname()}:{pid}:"
        try:
            lost_batch(self.platform.ledger, [c.request.id for c in self.calls], prefix)
        except Exception:
            # leases lapse and the reaper takes the jobs back (a worker loss counted)
            log.exception("handing back a lost batch failed")


def _safely(callback: Callable[..., Any], *args: Any) -> None:
    try:
        callback(*args)
    except Exception:
        log.exception("batch callback %r failed", callback)
