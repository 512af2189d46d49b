"""The operations commands of ``synth-workers``: ``metrics serve``, ``status``, ``check``.

Registered on the main group by ``synth_workers.cli``. Exit codes as there
(:class:`~synth_workers.clikit.ExitCode`): 0 ok, 1 a check failed, 2 bad usage or
configuration (a missing ``DATABASE_URL`` included), 3 a service is unavailable, 130
interrupted.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any

import click

from synth_workers.clikit import ExitCode, cli_settings, fail
from synth_workers.errors import ConfigurationError, SynthWorkersError

if TYPE_CHECKING:
    from synth_workers.app import SynthCelery


def _load_app() -> SynthCelery:
    from synth_workers.app import create_app

    return create_app(cli_settings())


@click.group("metrics")
def metrics_group() -> None:
    """Prometheus metrics of the whole cluster."""


@metrics_group.command("serve")
@click.option("--address", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=9809, show_default=True, help="Port to bind.")
def metrics_serve(address: str, port: int) -> None:
    """Serve the cluster-wide gauges (queue depth per priority, delayed jobs, oldest job age,
    DLQ size, workers per queue, beat's last slot) on /metrics, and /health. Run one per
    cluster: every worker serves its own job metrics already."""
    from synth_workers.health import DependencyChecks, health_document
    from synth_workers.logging import configure_logging
    from synth_workers.metrics import cluster_registry
    from synth_workers.opshttp import OpsServer, json_response, metrics_response

    app = _load_app()
    configure_logging(app.settings)
    registry = cluster_registry(app)
    checks = DependencyChecks(app)
    started = time.time()
    interval = app.settings.health_interval

    def health() -> tuple[int, str, bytes]:
        code, body = health_document(checks.results(max_age=interval), started, None)
        return json_response(code, body)

    routes = {
        "/metrics": metrics_response(lambda: registry),
        "/health": health,
        "/live": lambda: json_response(200, {"status": "ok"}),
    }
    try:
        server = OpsServer(address, port, routes)
    except OSError as exc:
        click.echo(f"error: cannot listen on {address}:{port}: {exc}", err=True)
        sys.exit(ExitCode.USAGE)
    stop = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)
    server.start()
    click.echo(f"serving   http://{server.address}:{server.port}/metrics  (Ctrl-C stops)")
    stop.wait()
    server.stop()
    app.close()


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def render_status(snap: dict[str, Any]) -> str:
    """The human form of a cluster snapshot."""
    out = [f"cluster status at {snap['at']}", ""]
    levels = list(range(9, -1, -1))
    header = (
        f"{'queue':18} {'waiting':>7} {'delayed':>7} {'oldest':>7} {'workers':>7}  by priority "
    )
    out.append(header + " ".join(f"{p:>4}" for p in levels))
    for q in snap["queues"]:
        depth = q["depth"]
        out.append(
            f"{q['queue'][:18]:18} {q['waiting']:>7} {q['delayed']:>7} "
            f"{_age(q['oldest_age_seconds']):>7} {q['workers']:>7}  {'':12}"
            + " ".join(f"{depth.get(p, depth.get(str(p), 0)):>4}" for p in levels)
        )
    out.append("")
    out.append(f"workers ({len(snap['workers'])})")
    for w in snap["workers"]:
        out.append(
            f"  {w.get('name', '?'):40} queues {','.join(w.get('queues', []))}  "
            f"heartbeat {_age(w.get('heartbeat_age_seconds'))} ago"
        )
    out.append("")
    out.append(f"dead-letter queue: {snap['dlq_size']} job(s)")
    states = ", ".join(f"{k} {v}" for k, v in snap["unfinished"].items())
    out.append(f"unfinished: {states}")
    if "last_hour" in snap:
        hour = ", ".join(f"{k} {v}" for k, v in snap["last_hour"].items() if v)
        out.append(f"enqueued in the last hour, by state now: {hour or 'none'}")
    return "\n".join(out)


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--watch", is_flag=True, help="Refresh until Ctrl-C, like top.")
@click.option("--interval", type=float, default=2.0, show_default=True, help="With --watch.")
def status(as_json: bool, watch: bool, interval: float) -> None:
    """Queues (depth per priority, delayed, oldest job), workers, DLQ size, jobs per state."""
    import redis

    from synth_workers.cluster import snapshot
    from synth_workers.settings import mask_url

    app = _load_app()
    try:
        while True:
            try:
                snap = snapshot(app, last_hour=True)
            except SynthWorkersError as exc:
                fail(exc)
            except redis.RedisError as exc:
                click.echo(
                    f"error: Redis is not reachable at {mask_url(app.settings.broker_url)} "
                    f"(REDIS_URL): {exc}",
                    err=True,
                )
                sys.exit(ExitCode.UNAVAILABLE)
            text = json.dumps(snap, indent=2) if as_json else render_status(snap)
            if not watch:
                click.echo(text)
                return
            click.clear()
            click.echo(text)
            time.sleep(interval)
    except KeyboardInterrupt:
        sys.exit(ExitCode.INTERRUPTED if not watch else ExitCode.OK)
    finally:
        app.close()


@click.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def check(as_json: bool) -> None:
    """Check the configuration, Redis, Postgres (ledger migrated) and Qdrant; exit 0 when
    all are ok, 1 otherwise."""
    from synth_workers.health import DependencyChecks, version
    from synth_workers.settings import load_settings

    result: dict[str, Any]
    try:
        settings = load_settings()  # a bad value is a failed check here (exit 1)
    except ConfigurationError as exc:
        result = {"status": "fail", "checks": {"configuration": {"status": "fail",
                                                                 "error": str(exc)}}}  # fmt: skip
    else:
        from synth_workers.app import create_app

        app = create_app(settings)
        checks: dict[str, Any] = {"configuration": {"status": "ok"}}
        checks.update(DependencyChecks(app).refresh())
        if checks["postgres"]["status"] == "ok":
            try:
                with app.ledger.connection() as conn:
                    app.ledger.check_tables(conn)
                checks["ledger"] = {"status": "ok"}
            except Exception as exc:
                checks["ledger"] = {
                    "status": "fail",
                    "error": f"{type(exc).__name__}: {exc}; run `synth-workers db migrate`",
                }
        app.close()
        failing = [k for k, v in checks.items() if v["status"] != "ok"]
        result = {"status": "fail" if failing else "ok", "version": version(), "checks": checks}
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
    else:
        for name, item in result["checks"].items():
            detail = item.get("url") or item.get("mode") or ""
            line = f"{name:13} {item['status']:4}  {detail}"
            if item.get("error"):
                line += f"  {item['error']}"
            click.echo(line, err=item["status"] != "ok")
    sys.exit(0 if result["status"] == "ok" else 1)
