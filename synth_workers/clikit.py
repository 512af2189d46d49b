"""What every ``synth-workers`` command shares: exit codes, the one-line error, its logging.

Exit codes (:class:`ExitCode`), one per cause, the same in every command: 0 ok, 1 a job or
check failed, 2 bad usage or configuration (a missing ``DATABASE_URL`` included), 3 a
service is unavailable, 130 interrupted.
"""

from __future__ import annotations

import logging
import sys
from enum import IntEnum
from typing import NoReturn

import click

from synth_workers.errors import (
    ConfigurationError,
    EnqueueError,
    ServiceUnavailableError,
    SynthWorkersError,
)
from synth_workers.settings import Settings, load_settings


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNAVAILABLE = 3
    INTERRUPTED = 130


def exit_code(exc: BaseException) -> ExitCode:
    """The exit code of a command that stopped on ``exc``."""
    if isinstance(exc, ServiceUnavailableError):
        return ExitCode.UNAVAILABLE
    if isinstance(exc, (ConfigurationError, EnqueueError)):
        return ExitCode.USAGE
    return ExitCode.FAILED


def fail(exc: SynthWorkersError) -> NoReturn:
    """Print ``exc`` as one line on stderr and exit with its code."""
    click.echo(f"error: {exc}", err=True)
    sys.exit(exit_code(exc))


def command_logging(settings: Settings) -> None:
    """The command's own process logs errors only, unless ``LOG_LEVEL`` is set: a
    background writer's retries are not news to someone who gets the command's one-line
    error (workers and servers configure their logs themselves)."""
    level = settings.log_level if "log_level" in settings.model_fields_set else "ERROR"
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)


def cli_settings(dev_stack: bool = True) -> Settings:
    """The settings (exit 2 with one line on a bad value), the command's logging set."""
    try:
        settings = load_settings(dev_stack=dev_stack)
    except ConfigurationError as exc:
        fail(exc)
    command_logging(settings)
    return settings
