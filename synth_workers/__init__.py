"""SynthStack Workers: a job-queue worker platform on Celery + Redis.

``celery -A synth_workers worker|beat|flower`` finds :data:`app` here (built on first use:
importing the package builds nothing). ``install(app)`` makes any Celery app a platform app.
"""

from synth_workers.app import SynthCelery, create_app
from synth_workers.app import app as app
from synth_workers.bulk import enqueue_many
from synth_workers.errors import (
    ConfigurationError,
    EnqueueError,
    InvalidArgumentsError,
    InvalidPayloadError,
    JobCancelledError,
    JobError,
    JobFailedError,
    JobNotFoundError,
    JobTimeoutError,
    PayloadTooLargeError,
    PayloadValidationError,
    PermanentError,
    RoutingError,
    ServiceUnavailableError,
    SynthWorkersError,
    TransientError,
    UnknownTaskError,
)
from synth_workers.install import install
from synth_workers.platform import Platform, platform_of
from synth_workers.producer import JobHandle, enqueue
from synth_workers.settings import Settings, load_settings
from synth_workers.states import JobState
from synth_workers.task import Task

__version__ = "0.1.0"

__all__ = [
    # the app
    "Platform",
    "SynthCelery",
    "Task",
    "app",
    "create_app",
    "install",
    "platform_of",
    # enqueueing
    "JobHandle",
    "JobState",
    "enqueue",
    "enqueue_many",
    # settings
    "Settings",
    "load_settings",
    # errors
    "ConfigurationError",
    "EnqueueError",
    "InvalidArgumentsError",
    "InvalidPayloadError",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "JobNotFoundError",
    "JobTimeoutError",
    "PayloadTooLargeError",
    "PayloadValidationError",
    "PermanentError",
    "RoutingError",
    "ServiceUnavailableError",
    "SynthWorkersError",
    "TransientError",
    "UnknownTaskError",
]
