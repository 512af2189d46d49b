"""``synth-workers``: the embedded stack, enqueueing and job inspection from a shell.

Exit codes (:class:`~synth_workers.clikit.ExitCode`), one per cause in every command: 0 ok,
1 a job or check failed, 2 bad usage or configuration (a missing ``DATABASE_URL``
included), 3 a service is unavailable, 130 interrupted. A platform error in any command is
one line on stderr. ``dev`` stops every child process on SIGINT (Ctrl-C) or SIGTERM, then
exits 0.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

import click

from synth_workers import healthcli, opscli
from synth_workers.clikit import ExitCode, cli_settings, fail
from synth_workers.errors import JobError, SynthWorkersError
from synth_workers.routing import Priority
from synth_workers.settings import Settings
from synth_workers.states import FINAL_STATES, JobState

if TYPE_CHECKING:
    from synth_workers.app import SynthCelery
    from synth_workers.deadletter import DLQFilter

__all__ = ["ExitCode", "main"]


def _settings(dev_stack: bool = True) -> Settings:
    return cli_settings(dev_stack)


def _fail(exc: SynthWorkersError) -> None:
    fail(exc)


class _Main(click.Group):
    """The command group; a platform error in any command is one line and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SynthWorkersError as exc:
            fail(exc)


@click.group(cls=_Main)
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
    until Ctrl-C. Other shells use it while REDIS_URL and DATABASE_URL are unset."""
    from synth_workers.dev import DevStack
    from synth_workers.devstate import read_state

    settings = _settings(dev_stack=False)
    running = read_state(settings.runtime_dir)
    if running is not None:
        click.echo(
            f"error: a dev stack is already running (pid {running.pid}, folder "
            f"{running.base_dir}); stop it (Ctrl-C in its shell) before starting another",
            err=True,
        )
        sys.exit(ExitCode.USAGE)
    stack = DevStack(settings, base_dir or settings.dev_dir, with_beat=beat, with_flower=flower)
    stop = _Stop()
    try:
        stack.start()
        stack.record()
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
        *_demo_embedding(app),
        *_demo_workflow(app),
    ]


def _demo_embedding(app: Any) -> list[tuple[str, Any]]:
    """Index one document into Qdrant (local mode unless QDRANT_URL), when an embedder is
    installed or configured (says so otherwise)."""
    import importlib.util

    from synth_workers.producer import enqueue

    s = app.settings
    if s.embed_provider == "local" and importlib.util.find_spec("sentence_transformers") is None:
        click.echo(
            "skipped   embeddings: the local model is not installed "
            "(pip install -e '.[embeddings]', or SYNTH_EMBED_PROVIDER=openai)"
        )
        return []
    document = {
        "id": "demo",
        "text": "SynthStack Workers indexes documents into Qdrant.",
        "metadata": {"source": "demo"},
    }
    handle = enqueue("tasks.embeddings.index_documents", {"documents": [document]}, app=app)
    return [(f"embeddings ({s.embed_provider})", handle)]


def _demo_workflow(app: Any) -> list[tuple[str, Any]]:
    """A one-document AI workflow, when an LLM provider is configured (says so otherwise)."""
    import importlib

    # by name: the job modules stay outside the typed package
    orchestration: Any = importlib.import_module("tasks.orchestration")
    s = app.settings
    if s.openai_api_key or s.openai_base_url:
        provider, model = "openai", s.llm_demo_model or "gpt-4o-mini"
    elif s.anthropic_api_key or s.anthropic_base_url:
        provider, model = "anthropic", s.llm_demo_model or "claude-3-5-haiku-latest"
    else:
        click.echo(
            "skipped   orchestration: no LLM configured (set OPENAI_API_KEY or OPENAI_BASE_URL,"
            " or ANTHROPIC_API_KEY or ANTHROPIC_BASE_URL)"
        )
        return []
    document = {"id": "demo", "text": "SynthStack Workers runs jobs on Celery and Redis."}
    payload = {
        "documents": [document],
        "instruction": "Summarize in one short sentence.",
        "provider": provider,
        "model": model,
        "max_tokens": 64,
    }
    handle = orchestration.enqueue_workflow(payload, app=app)
    return [(f"orchestration ({provider}/{model})", handle)]


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
    import os
    import shutil

    from synth_workers.app import create_app
    from synth_workers.dev import DevStack

    settings = _settings(dev_stack=False)
    failures = 0
    # Everything the demo makes stays there after it exits (logs, mail, the stopped services'
    # data), so every path it prints still exists; the next demo starts it afresh.
    base = settings.dev_dir.resolve() / "demo"
    shutil.rmtree(base, ignore_errors=True)
    outbox = base / "outbox"
    settings = settings.model_copy(update={"mail_outbox": outbox})
    # no Flower: its address and password would be dead once the demo exits
    stack = DevStack(settings, base, with_beat=True, with_flower=False)
    try:
        os.environ["SYNTH_MAIL_OUTBOX"] = str(outbox)  # children inherit it
        stack.start()
        app = create_app(
            settings.model_copy(
                update={
                    "redis_url": stack.env["REDIS_URL"],
                    "database_url": stack.env["DATABASE_URL"],
                }
            )
        )
        failures = _wait_for_demo_jobs(_demo_jobs(app, outbox), timeout)
        app.close()
    except SynthWorkersError as exc:
        stack.stop()
        _fail(exc)
    finally:
        stack.stop()
    sent = sorted(outbox.glob("*.eml"))
    click.echo(f"outbox    {len(sent)} message(s) kept in {outbox}")
    click.echo(f"kept      {base} (logs, mail, the stopped services' data)")
    click.echo("demo " + ("succeeded" if not failures else f"failed ({failures} job(s))"))
    sys.exit(ExitCode.OK if not failures else ExitCode.FAILED)


def _wait_for_demo_jobs(jobs: list[tuple[str, Any]], timeout: float) -> int:
    """Wait for the demo's jobs together, saying each state change and, every 5 s, what is
    still running; print each outcome; return how many failed."""
    started = time.monotonic()
    seen: dict[str, JobState] = {}
    waiting = dict(jobs)
    last_note = started
    while waiting and time.monotonic() - started < timeout:
        for label, handle in list(waiting.items()):
            state = handle.state()
            if seen.get(label) != state:
                seen[label] = state
                click.echo(f"waiting   {label}: {state} ({time.monotonic() - started:.0f}s)")
            if state in FINAL_STATES:
                del waiting[label]
        if waiting and time.monotonic() - last_note >= 5:
            last_note = time.monotonic()
            click.echo(
                f"waiting   {len(waiting)} job(s) not finished after "
                f"{last_note - started:.0f}s: {', '.join(waiting)}"
            )
        time.sleep(0.25)
    failures = 0
    for label, handle in jobs:
        try:
            result = handle.wait(timeout=0.5)
            click.echo(f"ok        {label}: {handle.state()} -> {json.dumps(result)}")
        except JobError as exc:
            failures += 1
            click.echo(f"FAILED    {label}: {exc}")
    return failures


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


def _app() -> SynthCelery:
    _settings()
    from synth_workers.app import app

    return app


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v.isoformat() if hasattr(v, "isoformat") else str(v) if isinstance(v, uuid.UUID) else v)
        for k, v in row.items()
    }


def _print_rows(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([_jsonable(r) for r in rows], indent=2))
        return
    click.echo(f"{'id':36}  {'state':15}  {'task':36}  {'queue':14}  att  error")
    for r in rows:
        error = f"{r.get('failure_class') or ''} {r.get('error_class') or ''}".strip()
        click.echo(
            f"{r['id']!s:36}  {r['state']:15}  {r['task'][:36]:36}  "
            f"{r['queue'][:14]:14}  {r['attempt']:3}  {error}"
        )


@main.group()
def db() -> None:
    """The job ledger's database."""


@db.command("migrate")
def db_migrate() -> None:
    """Apply the ledger's SQL migrations (idempotent)."""
    app = _app()
    try:
        applied = app.ledger.migrate()
    except SynthWorkersError as exc:
        _fail(exc)
    click.echo("applied: " + ", ".join(applied) if applied else "up to date")


@main.group()
def jobs() -> None:
    """Inspect and cancel jobs."""


@jobs.command("show")
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def jobs_show(job_id: str, as_json: bool) -> None:
    """Print a job's ledger row."""
    from synth_workers.producer import JobHandle

    try:
        row = JobHandle(job_id, app=_app()).info()
    except SynthWorkersError as exc:
        _fail(exc)
    click.echo(json.dumps(_jsonable(row), indent=2, sort_keys=True))
    del as_json  # the row is always printed as JSON


@jobs.command("list")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([s.value for s in JobState]),
    help="Repeatable.",
)
@click.option("--task", default=None)
@click.option("--queue", default=None)
@click.option(
    "--correlation-id",
    default=None,
    help="Only the jobs of this request id (and the jobs they started).",
)
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def jobs_list(
    states: tuple[str, ...],
    task: str | None,
    queue: str | None,
    correlation_id: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List jobs, newest first."""
    app = _app()
    try:
        rows = app.ledger.list_jobs(
            states=states, task=task, queue=queue, correlation_id=correlation_id, limit=limit
        )
    except SynthWorkersError as exc:
        _fail(exc)
    _print_rows(rows, as_json)


@jobs.command("cancel")
@click.argument("job_id")
def jobs_cancel(job_id: str) -> None:
    """Cancel a job: it never starts (exit 0); a running one is asked to stop (exit 1)."""
    app = _app()
    try:
        outcome = app.ledger.cancel(job_id)
    except SynthWorkersError as exc:
        _fail(exc)
    messages = {
        "cancelled": "cancelled: it will never start",
        "requested": "running: asked to stop",
        "final": "not cancelled: already finished",
        "unknown": f"no job {job_id}",
    }
    click.echo(messages[outcome])
    sys.exit(ExitCode.OK if outcome == "cancelled" else ExitCode.FAILED)


def _dlq_filter_options(fn: Any) -> Any:
    from synth_workers.deadletter import FAILURE_CLASSES

    for option in reversed(
        [
            click.option("--task", default=None, help="Only this task."),
            click.option("--queue", default=None, help="Only this queue."),
            click.option("--failure-class", default=None, type=click.Choice(FAILURE_CLASSES)),
            click.option("--older-than", type=float, default=None, help="Died over N seconds ago."),
            click.option("--newer-than", type=float, default=None, help="Died in the last N s."),
        ]
    ):
        fn = option(fn)
    return fn


def _dlq_filter(**kw: Any) -> DLQFilter:
    from synth_workers.deadletter import DLQFilter

    return DLQFilter(
        task=kw.get("task"),
        queue=kw.get("queue"),
        failure_class=kw.get("failure_class"),
        older_than=kw.get("older_than"),
        newer_than=kw.get("newer_than"),
    )


@main.group()
def dlq() -> None:
    """The dead-letter queue: list, show, replay, purge."""


@dlq.command("list")
@_dlq_filter_options
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dlq_list(limit: int, as_json: bool, **filters: Any) -> None:
    """List dead jobs, newest first."""
    from synth_workers.deadletter import DeadLetterQueue

    try:
        rows = DeadLetterQueue(_app()).list_dead(_dlq_filter(**filters), limit=limit)
    except SynthWorkersError as exc:
        _fail(exc)
    _print_rows(rows, as_json)


@dlq.command("show")
@click.argument("job_id")
def dlq_show(job_id: str) -> None:
    """A dead job with its payload, failure class and traceback (JSON)."""
    from synth_workers.deadletter import DeadLetterQueue

    row = DeadLetterQueue(_app()).show(job_id)
    if row is None:
        click.echo(f"no dead job {job_id}", err=True)
        sys.exit(ExitCode.FAILED)
    click.echo(json.dumps(_jsonable(row), indent=2, sort_keys=True))


@dlq.command("replay")
@click.argument("job_ids", nargs=-1)
@_dlq_filter_options
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead job (no filter).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def dlq_replay(job_ids: tuple[str, ...], replay_all: bool, as_json: bool, **filters: Any) -> None:
    """Re-enqueue dead jobs (by id, or by filter) with a fresh attempt budget."""
    from synth_workers.deadletter import DeadLetterQueue

    if not job_ids and not replay_all and not any(v is not None for v in filters.values()):
        click.echo("error: give job ids, a filter, or --all", err=True)
        sys.exit(ExitCode.USAGE)
    pairs = DeadLetterQueue(_app()).replay(list(job_ids) or None, _dlq_filter(**filters))
    if as_json:
        click.echo(json.dumps([{"original": a, "replay": b} for a, b in pairs]))
    else:
        for original, new in pairs:
            click.echo(f"{original} -> {new}")
        click.echo(f"replayed {len(pairs)} job(s)")


@dlq.command("purge")
@click.argument("job_ids", nargs=-1)
@_dlq_filter_options
@click.option("--all", "purge_all", is_flag=True, help="Purge every dead job (no filter).")
@click.option("--yes", is_flag=True, help="Do not ask.")
def dlq_purge(job_ids: tuple[str, ...], purge_all: bool, yes: bool, **filters: Any) -> None:
    """Delete dead jobs (by id, or by filter)."""
    from synth_workers.deadletter import DeadLetterQueue

    if not job_ids and not purge_all and not any(v is not None for v in filters.values()):
        click.echo("error: give job ids, a filter, or --all", err=True)
        sys.exit(ExitCode.USAGE)
    queue = DeadLetterQueue(_app())
    where = _dlq_filter(**filters)
    if not yes and not job_ids:
        click.confirm(f"purge {queue.count(where)} dead job(s)?", abort=True)
    count = queue.purge(list(job_ids) or None, where)
    click.echo(f"purged {count} job(s)")


# operations: `metrics serve`, `status`, `check` (synth_workers.opscli)
main.add_command(opscli.metrics_group)
main.add_command(opscli.status)
main.add_command(opscli.check)
main.add_command(healthcli.health)


def _add_events() -> None:
    from synth_workers.events.cli import events

    main.add_command(events)


_add_events()

if __name__ == "__main__":
    main()
