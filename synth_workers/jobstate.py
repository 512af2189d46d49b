"""The states of a job, as the ledger records them."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    RETRYING = "failed-retrying"
    DEAD = "dead"
    CANCELLED = "cancelled"
