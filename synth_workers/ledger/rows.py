"""What the ledger hands out and takes in: row types, value encoders, announce helpers.

:class:`Claim` is a job a worker runs (its fencing token), :class:`Publishable` what the
transport needs to (re)publish one. :class:`LedgerRows` announces committed state changes to
the process's :class:`~synth_workers.lifecycle.Lifecycle` from the rows statements return.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from celery.result import AsyncResult, GroupResult
from kombu.utils import json as kombu_json
from psycopg import sql
from psycopg.types.json import Jsonb

from synth_workers.correlation import of_headers
from synth_workers.ledger.pool import LedgerPool
from synth_workers.states import EventKind, FailureClass, JobState

RESULT_LIMIT_BYTES = 64 * 1024
NOTIFY_CHANNEL = "synth_outbox"

#: The columns :meth:`Publishable.from_row` reads, of ``synth_jobs`` aliased ``j``; the last
#: says whether its worker (or pool process) was lost under it (see ``Publishable.alone``).
PUBLISHABLE = sql.SQL(
    "j.id, j.task, j.queue, j.priority, j.payload, j.args, j.message, j.retries, "
    "j.failure_class IS NOT DISTINCT FROM {lost}"
).format(lost=sql.Literal(FailureClass.WORKER_LOST))


#: States of a job that has not started its current attempt (cancelling it is immediate).
NOT_STARTED = (JobState.SCHEDULED, JobState.QUEUED, JobState.RETRYING)
#: States a job can still leave, in the order listings show them.
UNFINISHED = (JobState.SCHEDULED, JobState.QUEUED, JobState.RUNNING, JobState.RETRYING)


@dataclass(frozen=True)
class Claim:
    """A job a worker now runs: its fencing token is ``attempt``."""

    job_id: str
    attempt: int
    max_attempts: int | None
    owner: str
    task: str | None = None
    queue: str | None = None
    user_id: str | None = None
    #: The caller's request id (``synth_workers.correlation``).
    correlation_id: str | None = None
    #: Unix times: when the job was enqueued, and when this attempt was claimed.
    enqueued_at: float | None = None
    #: Someone waited on the job when it was claimed (``wait()``, ``get()``: ``synth_waits``):
    #: its completion is written at once, not after the completer's linger.
    waited: bool = False
    claimed_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Publishable:
    """What the transport needs to (re)publish a job."""

    id: str
    task: str
    queue: str
    priority: int
    payload: dict[str, Any]
    args: list[Any] | None = None
    #: The Celery message as sent (``synth_workers.message``); ``None`` for older rows.
    message: dict[str, Any] | None = None
    #: Celery's ``request.retries`` for the next run.
    retries: int = 0
    #: Its last attempt's worker or pool process was lost (reaped, or lost in a batch and
    #: re-published): sent marked to run alone (``synth_workers.batched``), so a poison pill
    #: never shares a batch again, whichever path sends it.
    alone: bool = False
    #: The time a delayed job or a retry was due (its message's ``eta``, as Celery's
    #: ``request.eta`` reports it); ``None``: sent as due now.
    eta: datetime | None = None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Publishable:
        """From ``RETURNING`` :data:`PUBLISHABLE` (nine columns)."""
        return cls(
            str(row[0]), row[1], row[2], row[3], row[4], row[5], row[6], int(row[7]), bool(row[8])
        )


def arguments_json(value: Any) -> Jsonb:
    """A job's ``args`` or payload as ``jsonb``, in kombu's JSON as Celery sends it: the types
    Celery's ``json`` serializer carries (bytes, datetime, UUID, Decimal) are kept as its
    ``{"__type__", "__value__"}`` objects, which a worker's kombu turns back into them when
    the row is published again."""
    return Jsonb(value, dumps=kombu_json.dumps)


def message_json(message: dict[str, Any] | None) -> Jsonb | None:
    """A Celery message for its jsonb column: kombu's JSON encoder, so dates and UUIDs in
    signatures are written the way kombu reads them back when the message is re-sent."""
    return None if message is None else Jsonb(message, dumps=kombu_json.dumps)


def clip_text(value: Any, limit: int) -> str:
    """``value`` as text Postgres takes (no NUL, no lone surrogate), at most ``limit`` long."""
    text = value if isinstance(value, str) else repr(value)
    text = text[:limit].replace("\x00", "\\x00")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def result_json(result: Any) -> str:
    """A task's result (or an effect's detail) as JSON text, replaced by a marker when too
    big. A task that returns a result (``AsyncResult``, ``GroupResult``) stores its tuple
    form, as Celery's backends do."""
    if isinstance(result, AsyncResult | GroupResult):
        result = result.as_tuple()
    try:
        text = json.dumps(result, default=str)
    except (TypeError, ValueError):
        text = json.dumps(repr(result))
    if len(text) > RESULT_LIMIT_BYTES:
        return json.dumps({"truncated": True, "bytes": len(text)})
    return text


def text_array(texts: Iterable[str]) -> str:
    """A Postgres array literal of ``texts``, each quoted: sent as one string (psycopg dumps
    a string in C, a list element by element in Python), cast in the statement."""
    quoted = ",".join('"' + t.replace("\\", "\\\\").replace('"', '\\"') + '"' for t in texts)
    return "{" + quoted + "}"


def encode_result(result: Any) -> Jsonb:
    """:func:`result_json` as a jsonb parameter (psycopg sends the text as it is)."""
    return Jsonb(result_json(result), dumps=_as_is)


def _as_is(text: Any) -> str:
    return str(text)


def exception_origin(exc: BaseException | None, error_class: str) -> tuple[str | None, Any]:
    """``exc``'s module and its arguments as JSON (``None`` when they do not encode). Without
    ``exc``, the exception being handled (or the one it wraps: ``exc``, ``__cause__``,
    ``__context__``) whose class is named ``error_class``; ``(None, None)`` when none is."""
    if exc is None:
        handled = sys.exc_info()[1]
        candidates = (
            handled,
            getattr(handled, "exc", None),
            getattr(handled, "__cause__", None),
            getattr(handled, "__context__", None),
        )
        exc = next(
            (
                c
                for c in candidates
                if isinstance(c, BaseException) and type(c).__name__ == error_class
            ),
            None,
        )
    if exc is None:
        return None, None
    try:
        args = Jsonb(json.loads(json.dumps(list(exc.args))))
    except (TypeError, ValueError):
        args = None
    return type(exc).__module__, args


class LedgerRows(LedgerPool):
    """Announcements of committed state changes, from claims and returned rows."""

    @staticmethod
    def about(claim: Claim) -> dict[str, Any]:
        """The fields a lifecycle announcement about ``claim``'s job carries."""
        return {
            "task": claim.task,
            "queue": claim.queue,
            "attempt": claim.attempt,
            "user_id": claim.user_id,
            "correlation_id": claim.correlation_id,
        }

    def announce_started(self, claim: Claim, at: float | None = None) -> None:
        """The ``started`` event of a job just claimed, with its wait in the queue until its
        claim, or until ``at`` (a job claimed with its batch starts later)."""
        if self.lifecycle.listening:
            start = claim.claimed_at if at is None else at
            since = claim.enqueued_at or start
            wait = {"queue_wait": max(0.0, start - since)}
            self.lifecycle.announce(EventKind.STARTED, claim.job_id, **self.about(claim), data=wait)

    def announce_finish(self, claim: Claim, kind: str, **data: Any) -> None:
        if self.lifecycle.listening:
            data.setdefault("runtime", max(0.0, time.time() - claim.claimed_at))
            self.lifecycle.announce(kind, claim.job_id, **self.about(claim), data=data)

    def _announce_row(self, kind: str, job_id: str, row: Sequence[Any], **data: Any) -> None:
        """Announce from a ``RETURNING state, task, queue, attempt`` row."""
        if self.lifecycle.listening:
            self.lifecycle.announce(
                kind, job_id, task=row[1], queue=row[2], attempt=row[3], data=data
            )

    def _announce_queued(self, jobs: Sequence[Publishable], reason: str) -> None:
        if self.lifecycle.listening:
            for job in jobs:
                self.lifecycle.announce(
                    EventKind.QUEUED,
                    job.id,
                    task=job.task,
                    queue=job.queue,
                    correlation_id=of_headers((job.message or {}).get("headers")),
                    data={"reason": reason},
                )
