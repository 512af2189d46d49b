"""Every error the platform raises, under one root.

::

    SynthWorkersError
     ├── ConfigurationError          a setting is missing or wrong (names the variable)
     ├── ServiceUnavailableError     Redis/Postgres/Qdrant cannot be reached (says how to start it)
     ├── EnqueueError                the job was refused at enqueue; nothing was queued
     │    ├── UnknownTaskError       no task of that name is registered
     │    ├── PayloadValidationError the payload does not match the task's model
     │    ├── PayloadTooLargeError   the serialized payload is over SYNTH_MAX_PAYLOAD_BYTES
     │    └── RoutingError           bad priority, or a queue the job cannot go to
     ├── JobError                    raised by ``JobHandle`` about one job
     │    ├── JobNotFoundError       no such job id (never enqueued, or expired)
     │    ├── JobFailedError         the job ended dead (its error class and message attached)
     │    ├── JobCancelledError      the job was cancelled before it ran
     │    └── JobTimeoutError        ``wait(timeout=...)`` ran out (the job goes on)
     ├── TransientError              raised by job code: retry with backoff
     │    ├── RateLimitedError       a shared limit or a provider's 429 said wait (retry_after)
     │    └── ProviderUnavailableError  5xx, connection error, timeout (retry_after if told)
     └── PermanentError              raised by job code: dead-letter now, never retry
          ├── InvalidPayloadError    the worker could not parse the payload
          │    └── InvalidArgumentsError  the arguments do not bind (also a TypeError)
          └── ProviderRejectedError  the provider refused the request (400/401/403/404)

Job code raises ``TransientError`` or ``PermanentError`` (or a provider leaf under them); any
other exception is treated by the retry policy of the task (see ``synth_workers.runner``).
"""

from __future__ import annotations


class SynthWorkersError(Exception):
    """Root of every error raised by SynthStack Workers."""


class ConfigurationError(SynthWorkersError):
    """A setting is missing or has a wrong value; the message names the variable."""


class ServiceUnavailableError(SynthWorkersError):
    """A service the platform needs cannot be reached; the message says how to start it."""


class EnqueueError(SynthWorkersError):
    """A job was refused at enqueue; nothing was queued."""


class UnknownTaskError(EnqueueError, LookupError):
    """No task of that name is registered on the app."""


class PayloadValidationError(EnqueueError, ValueError):
    """The payload does not match the task's payload model or signature."""


class PayloadTooLargeError(EnqueueError, ValueError):
    """The JSON-serialized payload is over the configured cap."""


class RoutingError(EnqueueError, ValueError):
    """An invalid priority, or a queue the job cannot be routed to."""


class JobError(SynthWorkersError):
    """An error about one job, raised by :class:`~synth_workers.producer.JobHandle`."""

    def __init__(self, job_id: str, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id


class JobNotFoundError(JobError, LookupError):
    """No job with that id is known (never enqueued, or its record expired)."""


class JobFailedError(JobError):
    """The job ended dead; ``error_class`` and ``error`` say why."""

    def __init__(self, job_id: str, error_class: str, error: str) -> None:
        super().__init__(job_id, f"job {job_id} failed: {error_class}: {error}")
        self.error_class = error_class
        self.error = error


class JobCancelledError(JobError):
    """The job was cancelled before it ran."""


class JobTimeoutError(JobError, TimeoutError):
    """``JobHandle.wait`` gave up; the job itself goes on."""


class TransientError(SynthWorkersError):
    """A failure worth retrying (rate limit, 5xx, lost connection): retried with backoff."""


class PermanentError(SynthWorkersError):
    """A failure that retrying cannot fix: the job is dead-lettered at once."""


class InvalidPayloadError(PermanentError):
    """The worker could not parse the job's payload into the task's model."""


class InvalidArgumentsError(InvalidPayloadError, TypeError):
    """The job's arguments do not bind to the task's signature (missing or unexpected
    ones): the ``TypeError`` Celery's task call raises, dead at once."""


# --- provider errors (email and LLM providers) ------------------------------------------------


class RateLimitedError(TransientError):
    """Over a shared rate limit or a provider's (429): wait ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ProviderUnavailableError(TransientError):
    """The provider failed in a way worth retrying: 5xx, a lost connection, a timeout."""

    def __init__(
        self, message: str, status: int | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class ProviderRejectedError(PermanentError):
    """The provider refused the request for good; the message carries the provider's text."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
