"""``synth-workers health beat|worker``: liveness probes that read a heartbeat file.

For exec probes (Kubernetes ``livenessProbe``, compose ``healthcheck``): no broker or
database round trip, only the age of the file the process's own loop rewrites
(``synth_workers.heartbeat``). Exit codes (:class:`~synth_workers.clikit.ExitCode`):

- 0 (``OK``): the loop turned within ``--max-age`` seconds;
- 1 (``FAILED``): it did not (hung, frozen, stopped or not started), or the file is missing;
- 2 (``USAGE``): no heartbeat file is configured.

``--max-age`` defaults to twice ``SYNTH_HEALTH_INTERVAL``: beat's loop turns at least once per
interval, so a beat stopped or stuck in a tick fails the probe within two intervals.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from synth_workers.clikit import ExitCode, cli_settings
from synth_workers.heartbeat import read_heartbeat


def _probe(path: Path | None, variable: str, max_age: float | None, interval: float) -> None:
    if path is None:
        click.echo(
            f"error: no heartbeat file: set {variable} for the process and the probe "
            "(or pass --file)",
            err=True,
        )
        sys.exit(ExitCode.USAGE)
    verdict = read_heartbeat(path, max_age if max_age is not None else 2 * interval)
    click.echo(("live: " if verdict.live else "not live: ") + verdict.reason, err=not verdict.live)
    sys.exit(ExitCode.OK if verdict.live else ExitCode.FAILED)


@click.group("health")
def health() -> None:
    """Liveness probes reading a process's heartbeat file (exit 0 live, 1 not, 2 unset)."""


_MAX_AGE = click.option(
    "--max-age",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    envvar="SYNTH_HEALTH_MAX_AGE",
    help="Seconds after which the heartbeat is stale [default: 2 x SYNTH_HEALTH_INTERVAL].",
)


@health.command("beat")
@click.option(
    "--file",
    "path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Beat's heartbeat file [default: SYNTH_BEAT_HEARTBEAT_FILE].",
)
@_MAX_AGE
def beat(path: Path | None, max_age: float | None) -> None:
    """Is beat's scheduler loop turning? (Its heartbeat file is fresh.)"""
    settings = cli_settings(dev_stack=False)
    chosen = path or settings.beat_heartbeat_file
    _probe(chosen, "SYNTH_BEAT_HEARTBEAT_FILE", max_age, settings.health_interval)


@health.command("worker")
@click.option(
    "--file",
    "path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The worker's heartbeat file [default: SYNTH_HEARTBEAT_FILE].",
)
@_MAX_AGE
def worker(path: Path | None, max_age: float | None) -> None:
    """Is the worker's consumer consuming? (Its heartbeat file is fresh.)"""
    settings = cli_settings(dev_stack=False)
    chosen = path or settings.heartbeat_file
    _probe(chosen, "SYNTH_HEARTBEAT_FILE", max_age, settings.health_interval)
