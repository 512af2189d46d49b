"""``synth-workers events``: the SSE server and a terminal tail of job events."""

from __future__ import annotations

import datetime as dt
import sys

import click

from synth_workers.errors import ConfigurationError, SynthWorkersError
from synth_workers.events.stream import Event


@click.group("events")
def events() -> None:
    """Job lifecycle and progress events (Redis Streams, SSE)."""


@events.command("serve")
@click.option(
    "--address",
    default=None,
    help="Address to bind (SYNTH_EVENTS_ADDRESS, default 127.0.0.1).",
)
@click.option(
    "--port",
    type=int,
    default=None,
    help="Port (SYNTH_EVENTS_PORT, default 8765; 0: a free one, printed).",
)
def serve_cmd(address: str | None, port: int | None) -> None:
    """Serve events over SSE: GET /events?job=ID|user=ID (a JWT as bearer header or
    access_token parameter), GET /health; pages of CORS_ORIGINS may read it.

    Runs until SIGINT or SIGTERM (exit 0). Needs JWT_SECRET of at least 32 bytes (exit 2
    without it or with a shorter one). Logs (one line per request) go to stderr.
    """
    from synth_workers.cli import ExitCode, _settings
    from synth_workers.events.server import serve
    from synth_workers.logging import configure_logging

    settings = _settings()
    configure_logging(settings)

    def listening(host: str, actual: int) -> None:
        click.echo(f"events: listening on http://{host}:{actual}", err=False)
        sys.stdout.flush()

    try:
        serve(settings, address, port, on_listening=listening)
    except ConfigurationError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.USAGE)
    except OSError as exc:
        click.echo(f"error: cannot listen: {exc}", err=True)
        sys.exit(ExitCode.USAGE)


@events.command("token")
@click.argument("user")
@click.option(
    "--ttl",
    type=float,
    default=3600.0,
    show_default=True,
    help="Seconds the token is good for (at most SYNTH_EVENTS_TOKEN_MAX_TTL).",
)
def token_cmd(user: str, ttl: float) -> None:
    """Print a token that lets USER read their own jobs' events from `events serve`
    (header `Authorization: Bearer <token>`, or `?access_token=<token>` for a browser's
    EventSource). Signed with JWT_SECRET, as the server checks it; exit 2 without it."""
    from synth_workers.cli import ExitCode, _settings
    from synth_workers.events.auth import issue_token, secret_of

    settings = _settings()
    if not user.strip():
        click.echo("error: USER must not be empty", err=True)
        sys.exit(ExitCode.USAGE)
    limit = settings.events_token_max_ttl
    if not 0 < ttl <= limit:
        click.echo(
            f"error: --ttl must be above 0 and at most {limit:g} s "
            "(SYNTH_EVENTS_TOKEN_MAX_TTL: the server refuses longer-lived tokens)",
            err=True,
        )
        sys.exit(ExitCode.USAGE)
    try:
        secret = secret_of(settings)
    except ConfigurationError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(ExitCode.USAGE)
    click.echo(issue_token(secret, user, ttl))


def describe(event: Event) -> str:
    """One human-readable line."""
    when = dt.datetime.fromtimestamp(event.at, tz=dt.UTC).strftime("%H:%M:%S.%f")[:-3]
    parts = [when, f"{event.kind:<18}", event.job_id]
    if event.task:
        parts.append(event.task)
    if event.attempt is not None:
        parts.append(f"attempt {event.attempt}")
    if event.user_id:
        parts.append(f"user {event.user_id}")
    data = dict(event.data)
    if event.kind == "progress":
        total = data.get("total")
        text = f"{data.get('current')}/{total}" if total is not None else f"{data.get('current')}"
        if data.get("message"):
            text += f" {data['message']}"
        parts.append(text)
    elif data:
        parts.append(" ".join(f"{k}={v}" for k, v in data.items()))
    return "  ".join(parts)


@events.command("tail")
@click.option("--job", "job_id", default=None, help="One job's events (its whole history).")
@click.option("--user", "user_id", default=None, help="One user's events.")
@click.option("--since", default=None, help="Start after this event id (0: all kept).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def tail_cmd(job_id: str | None, user_id: str | None, since: str | None, as_json: bool) -> None:
    """Print events as they come (all jobs' unless --job/--user) until Ctrl-C; with --job,
    until the job ends."""
    from synth_workers.cli import ExitCode, _app, _fail
    from synth_workers.events import subscribe

    app = _app()
    try:
        for event in subscribe(user_id=user_id, job_id=job_id, since=since, app=app):
            click.echo(event.to_json() if as_json else describe(event))
    except KeyboardInterrupt:
        sys.exit(ExitCode.INTERRUPTED)
    except SynthWorkersError as exc:
        _fail(exc)
    except Exception as exc:  # redis errors: the service is unavailable
        import redis

        if isinstance(exc, redis.RedisError):
            click.echo(f"error: Redis: {exc} (REDIS_URL)", err=True)
            sys.exit(ExitCode.UNAVAILABLE)
        raise
