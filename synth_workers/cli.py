"""``synth-workers``: the embedded stack, enqueueing and job inspection from a shell.

Exit codes (:class:`ExitCode`): 0 ok, 1 a job or check failed, 2 bad usage or configuration,
3 a service is unavailable, 130 interrupted. ``dev`` stops every child process on SIGINT
(Ctrl-C) or SIGTERM, then exits 0.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import threading
import time
from enum import IntEnum
from pathlib import Path
from types import FrameType
from typing import Any, cast

import click

from synth_workers.errors import (
    ConfigurationError,
    EnqueueError,
    JobError,
    ServiceUnavailableError,
    SynthWorkersError,
)
from synth_workers.routing import Priority
from synth_workers.settings import Settings, load_settings


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1
    USAGE = 2
    UNAVAILABLE = 3
    INTERRUPTED = 130


def _settings() -> Settings:
    try:
        return load_settings()
    except ConfigurationError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.USAGE)


def _fail(exc: SynthWorkersError) -> None:
    click.echo(f"error: {exc}", err=True)
    if isinstance(exc, ServiceUnavailableError):
        sys.exit(ExitCode.UNAVAILABLE)
    if isinstance(exc, (ConfigurationError, EnqueueError)):
        sys.exit(ExitCode.USAGE)
    sys.exit(ExitCode.FAILED)


@click.group()
@click.version_option(package_name="synth-workers")
def main() -> None:
    """SynthStack Workers: job-queue workers on Celery + Redis."""


class _Stop:
    """Turns SIGINT/SIGTERM into a flag the supervising loop reads."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.event.set()


@main.command()
@click.option(
    "--dir",
    "base_dir",
    type=click.Path(path_type=Path),
    envvar="SYNTH_DEV_DIR",
    default=None,
    help="State folder of the embedded stack [SYNTH_DEV_DIR].",
)
@click.option("--beat/--no-beat", default=True, help="Run beat (periodic jobs).")
@click.option("--flower/--no-flower", default=True, help="Run Flower on 127.0.0.1.")
def dev(base_dir: Path | None, beat: bool, flower: bool) -> None:
    """Run the embedded stack (Valkey, Postgres, Qdrant local) with workers, beat and Flower
    until Ctrl-C."""
    from synth_workers.dev import DevStack

    settings = _settings()
    stack = DevStack(settings, base_dir or settings.dev_dir, with_beat=beat, with_flower=flower)
    stop = _Stop()
    try:
        stack.start()
        click.echo("ready     press Ctrl-C to stop")
        while not stop.event.wait(0.5):
            stack.check_children()
    except SynthWorkersError as exc:
        stack.stop()
        _fail(exc)
    click.echo("stopping  every worker, beat and Flower ...")
    stack.stop()
    click.echo("stopped")


def _demo_jobs(app: Any, outbox: Path) -> list[tuple[str, Any]]:
    from synth_workers.producer import enqueue

    return [
        (
            "email (welcome)",
            enqueue(
                "tasks.email.send_email",
                {"to": "demo@example.com", "template": "welcome", "context": {"name": "Demo"}},
                priority="high",
                idempotency_key=f"demo-welcome-{time.time_ns()}",
                app=app,
            ),
        ),
        ("system ping", enqueue("tasks.system.ping", {"message": "ping"}, app=app)),
    ]


@main.command()
@click.option(
    "--timeout",
    type=float,
    default=60.0,
    show_default=True,
    help="Seconds to wait for each demo job.",
)
def demo(timeout: float) -> None:
    """Start the embedded stack, run one job of each kind, print outcomes, stop; exit 0 only
    if every job succeeded."""
    from synth_workers.app import create_app
    from synth_workers.dev import DevStack

    settings = _settings()
    failures = 0
    with tempfile.TemporaryDirectory(prefix="synth-demo-") as tmp:
        base = Path(tmp)
        outbox = base / "outbox"
        settings = settings.model_copy(update={"mail_outbox": outbox})
        stack = DevStack(settings, base, with_beat=True, with_flower=True)
        try:
            import os

            os.environ["SYNTH_MAIL_OUTBOX"] = str(outbox)  # children inherit it
            stack.start()
            app = create_app(settings.model_copy(update={"redis_url": stack.env["REDIS_URL"]}))
            for label, handle in _demo_jobs(app, outbox):
                try:
                    result = handle.wait(timeout=timeout)
                    click.echo(f"ok        {label}: {handle.state()} -> {json.dumps(result)}")
                except JobError as exc:
                    failures += 1
                    click.echo(f"FAILED    {label}: {exc}")
            sent = sorted(outbox.glob("*.eml"))
            click.echo(f"outbox    {len(sent)} message(s) written to {outbox}")
            app.close()
        except SynthWorkersError as exc:
            stack.stop()
            _fail(exc)
        finally:
            stack.stop()
    click.echo("demo " + ("succeeded" if not failures else f"failed ({failures} job(s))"))
    sys.exit(ExitCode.OK if not failures else ExitCode.FAILED)


@main.command("enqueue")
@click.argument("task_name")
@click.argument("payload", default="{}")
@click.option("--priority", default=None, help="high, normal, low or 0-9 (bigger first).")
@click.option("--delay", type=float, default=None, help="Seconds before it may run.")
@click.option("--key", "idempotency_key", default=None, help="Idempotency key.")
@click.option("--queue", default=None, help="Override the route.")
@click.option("--wait", "wait_s", type=float, default=None, help="Wait this long for the result.")
def enqueue_cmd(
    task_name: str,
    payload: str,
    priority: str | None,
    delay: float | None,
    idempotency_key: str | None,
    queue: str | None,
    wait_s: float | None,
) -> None:
    """Enqueue TASK_NAME with a JSON PAYLOAD; print the job id."""
    from synth_workers.producer import enqueue

    _settings()
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        click.echo(f"error: PAYLOAD is not JSON: {exc}", err=True)
        sys.exit(ExitCode.USAGE)
    level = cast(Priority | None, int(priority) if priority and priority.isdigit() else priority)
    try:
        handle = enqueue(
            task_name,
            data,
            priority=level,
            delay=delay,
            idempotency_key=idempotency_key,
            queue=queue,
        )
        click.echo(handle.id)
        if wait_s is not None:
            click.echo(json.dumps(handle.wait(timeout=wait_s)))
    except SynthWorkersError as exc:
        _fail(exc)


@main.group()
def jobs() -> None:
    """Inspect and cancel jobs."""


@jobs.command("show")
@click.argument("job_id")
def jobs_show(job_id: str) -> None:
    """Print a job's record as JSON."""
    from synth_workers.producer import JobHandle

    _settings()
    try:
        click.echo(json.dumps(JobHandle(job_id).info(), indent=2, sort_keys=True))
    except SynthWorkersError as exc:
        _fail(exc)


@jobs.command("cancel")
@click.argument("job_id")
def jobs_cancel(job_id: str) -> None:
    """Cancel a job that has not started; exit 1 if it already ran."""
    from synth_workers.producer import JobHandle

    _settings()
    try:
        cancelled = JobHandle(job_id).cancel()
    except SynthWorkersError as exc:
        _fail(exc)
    click.echo("cancelled" if cancelled else "not cancelled: already running or finished")
    sys.exit(ExitCode.OK if cancelled else ExitCode.FAILED)


@main.command()
def check() -> None:
    """Check the configuration and that Redis answers; exit 0 or non-zero."""
    import redis

    from synth_workers.settings import mask_url

    settings = _settings()
    try:
        redis.Redis.from_url(settings.broker_url, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        click.echo(
            f"redis     {mask_url(settings.broker_url)}: unreachable ({exc}); start "
            "redis-server or `synth-workers dev`, or set REDIS_URL",
            err=True,
        )
        sys.exit(ExitCode.UNAVAILABLE)
    click.echo(f"redis     {mask_url(settings.broker_url)}: ok")
    sys.exit(ExitCode.OK)


if __name__ == "__main__":
    main()
