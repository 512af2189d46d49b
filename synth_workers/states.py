"""One vocabulary for the ledger: job states, failure classes and event kinds.

Each is a :class:`~enum.StrEnum` whose values are what the ledger stores and what events
carry, so a member is passed to SQL as a parameter (psycopg adapts a ``str``) and compares
equal to the stored text. "Final" is defined here, once: a job in a final state never
changes again, and an event of a final kind is the last one of its job.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """The ``state`` column of ``synth_jobs``."""

    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    RETRYING = "failed-retrying"
    DEAD = "dead"
    CANCELLED = "cancelled"


#: States a job never leaves.
FINAL_STATES: frozenset[JobState] = frozenset(
    {JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED}
)


class FailureClass(StrEnum):
    """Why an attempt failed (the ``failure_class`` column, the metrics label)."""

    #: The task raised.
    EXCEPTION = "exception"
    #: The soft time limit was exceeded.
    SOFT_TIMEOUT = "soft_timeout"
    #: The hard time limit killed the pool process.
    HARD_TIMEOUT = "hard_timeout"
    #: A provider quota was full: the attempt was deferred.
    RATE_LIMITED = "rate_limited"
    #: The payload cannot bind to the task's signature: dead at once.
    INVALID_PAYLOAD = "invalid_payload"
    #: The worker running the job was lost (its lease lapsed).
    WORKER_LOST = "worker_lost"
    #: The job was the last thing running on too many lost workers.
    POISON_PILL = "poison_pill"
    #: The message could not be decoded or screened at the broker.
    REJECTED_MESSAGE = "rejected_message"


class EventKind(StrEnum):
    """The ``kind`` of a lifecycle event."""

    QUEUED = "queued"
    SCHEDULED = "scheduled"
    STARTED = "started"
    PROGRESS = "progress"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    DEAD = "dead"
    CANCELLED = "cancelled"
    LATE_REFUSED = "late_refused"
    # announced by tasks.orchestration (not job states: never final)
    WORKFLOW_COMPLETED = "workflow_completed"
    USAGE = "usage"


#: Kinds after which a job never changes again (one per final state).
FINAL_KINDS: frozenset[EventKind] = frozenset(
    {EventKind.SUCCEEDED, EventKind.DEAD, EventKind.CANCELLED}
)

#: The final state each final event kind announces.
STATE_OF_FINAL_KIND: dict[EventKind, JobState] = {
    EventKind.SUCCEEDED: JobState.SUCCEEDED,
    EventKind.DEAD: JobState.DEAD,
    EventKind.CANCELLED: JobState.CANCELLED,
}

__all__ = [
    "FINAL_KINDS",
    "FINAL_STATES",
    "STATE_OF_FINAL_KIND",
    "EventKind",
    "FailureClass",
    "JobState",
]
