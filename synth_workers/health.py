"""Worker health: a local heartbeat, readiness, cached dependency checks and the HTTP probes.

- **Liveness** is a cheap local fact. A consumer bootstep (:class:`HeartbeatStep`) beats on
  the worker's own timer every ``SYNTH_HEALTH_INTERVAL`` seconds while the consumer runs and
  consumes at least one queue, and rewrites ``SYNTH_HEARTBEAT_FILE`` when set. ``/live``
  fails when the consumer stopped or consumes nothing (found at the next beat, so within the
  interval), or when the last beat is older than twice the interval (a frozen event loop).
  While the worker starts (before it first consumed) ``/live`` is ok.
- **Readiness**: ``/ready`` is ok once the consumer consumes, and while it does.
- **Dependencies** (Redis, Postgres, Qdrant when ``QDRANT_URL`` is set) are checked by a
  background thread once per interval, which also publishes the worker's heartbeat to Redis
  for ``synth-workers status``; ``/health`` serves the cached results, so no probe ever costs
  a round trip to the broker.

The HTTP server (``synth_workers.opshttp``, a thread of the worker's main process) serves
``/metrics``, ``/live``, ``/ready`` and ``/health`` on ``SYNTH_METRICS_ADDRESS:
SYNTH_METRICS_PORT``; ``synth-workers metrics serve`` uses the same server for the cluster.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import bootsteps

from synth_workers import metrics
from synth_workers.cluster import worker_key
from synth_workers.opshttp import OpsServer, Response, json_response, metrics_response
from synth_workers.platform import platform_of
from synth_workers.redisconn import redis_client
from synth_workers.settings import mask_url

if TYPE_CHECKING:
    from synth_workers.app import SynthCelery
    from synth_workers.platform import Platform
    from synth_workers.settings import Settings

log = logging.getLogger(__name__)


def version() -> str:
    try:
        return metadata.version("synth-workers")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


# --- dependency checks -------------------------------------------------------------------


def _timed(check: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        extra = check() or {}
        result = {"status": "ok", **extra}
    except Exception as exc:
        result = {"status": "fail", "error": f"{type(exc).__name__}: {exc}"[:500]}
    result["latency_ms"] = round((time.perf_counter() - start) * 1000, 2)
    result["checked_at"] = time.time()
    return result


class DependencyChecks:
    """Redis, Postgres and Qdrant checks; :meth:`results` returns the last ones (cached)."""

    def __init__(self, app: Platform | SynthCelery, timeout: float = 3.0) -> None:
        self.app = app
        self.timeout = timeout
        self._results: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()
        self.runs = 0

    def redis(self) -> dict[str, Any] | None:
        url = self.app.settings.broker_url
        client = redis_client(
            self.app.settings, socket_connect_timeout=self.timeout, socket_timeout=self.timeout
        )
        try:
            client.ping()
        finally:
            client.close()
        return {"url": mask_url(url)}

    def postgres(self) -> dict[str, Any] | None:
        import psycopg

        ledger = self.app.ledger
        with psycopg.connect(
            ledger.conninfo, connect_timeout=max(1, int(self.timeout)), autocommit=True
        ) as conn:
            conn.execute("SELECT 1")
        return {"url": mask_url(self.app.settings.database_url)}

    def qdrant(self) -> dict[str, Any] | None:
        settings = self.app.settings
        if not settings.qdrant_url:
            return {"mode": "local", "path": settings.qdrant_path}
        # http(s) only: QDRANT_URL is validated by the settings
        request = urllib.request.Request(settings.qdrant_url.rstrip("/") + "/readyz")  # noqa: S310
        if settings.qdrant_api_key:
            request.add_header("api-key", settings.qdrant_api_key.get_secret_value())
        with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
            response.read()
        return {"url": mask_url(settings.qdrant_url)}

    def refresh(self) -> dict[str, dict[str, Any]]:
        """Run the checks now (one caller at a time) and cache the results."""
        with self._refreshing:
            results = {
                "redis": _timed(self.redis),
                "postgres": _timed(self.postgres),
                "qdrant": _timed(self.qdrant),
            }
            with self._lock:
                self._results = results
                self.runs += 1
        return results

    def results(self, max_age: float | None = None) -> dict[str, dict[str, Any]]:
        """The cached results; checked here only when there are none yet, or when they are
        older than ``max_age`` (a burst of probes then costs one check, not one each)."""
        with self._lock:
            results = self._results
        oldest = min((r["checked_at"] for r in results.values()), default=0.0)
        if results and (max_age is None or time.time() - oldest <= max_age):
            return results
        with self._refreshing:  # a concurrent caller may have refreshed meanwhile
            with self._lock:
                results = self._results
            oldest = min((r["checked_at"] for r in results.values()), default=0.0)
            if results and (max_age is None or time.time() - oldest <= max_age):
                return results
        return self.refresh()


# --- the worker's own state --------------------------------------------------------------


class WorkerHealth:
    """Liveness and readiness of this worker, from its heartbeats."""

    def __init__(self, name: str, interval: float, heartbeat_file: Path | None = None) -> None:
        self.name = name
        self.interval = interval
        self.heartbeat_file = heartbeat_file
        self.started_at = time.time()
        self.pid = os.getpid()
        self.queues: list[str] = []
        self.consuming = False
        self.consumed_once = False
        self.last_beat: float | None = None  # monotonic
        self._lock = threading.Lock()

    def beat(self, queues: list[str]) -> None:
        """The consumer runs and consumes ``queues`` (called on the worker's timer)."""
        with self._lock:
            self.queues = queues
            self.consuming = bool(queues)
            if queues:
                self.consumed_once = True
                self.last_beat = time.monotonic()
        if queues and self.heartbeat_file is not None:
            self._write_file()

    def stopped(self) -> None:
        """The consumer stopped (connection lost, shutdown, or told to stop)."""
        with self._lock:
            self.consuming = False

    def _write_file(self) -> None:
        path = self.heartbeat_file
        assert path is not None
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_text(json.dumps({"at": time.time(), "pid": self.pid, "name": self.name}))
            tmp.replace(path)
        except OSError:
            log.exception("could not write the heartbeat file %s", path)

    def live(self) -> tuple[bool, str]:
        with self._lock:
            if not self.consumed_once:
                return True, "starting"
            if not self.consuming:
                return False, "the consumer is stopped or consumes no queue"
            age = time.monotonic() - (self.last_beat or 0.0)
        if age > 2 * self.interval:
            return False, f"last heartbeat {age:.1f}s ago (interval {self.interval}s)"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        ok, reason = self.live()
        with self._lock:
            consuming = self.consuming
        if not consuming:
            return False, "not consuming"
        return ok, reason

    def info(self) -> dict[str, Any]:
        live, _ = self.live()
        ready, _ = self.ready()
        with self._lock:
            return {
                "name": self.name,
                "pid": self.pid,
                "queues": list(self.queues),
                "live": live,
                "ready": ready,
                "started_at": self.started_at,
                "at": time.time(),
            }


def health_document(
    checks: dict[str, dict[str, Any]], started_at: float, worker: dict[str, Any] | None
) -> tuple[int, dict[str, Any]]:
    """The /health JSON: status, version, uptime, dependency checks (and the worker)."""
    failing = [name for name, result in checks.items() if result.get("status") != "ok"]
    status = "ok"
    if failing or (worker is not None and not worker["ready"]):
        status = "degraded"
    if worker is not None and not worker["live"]:
        status = "fail"
    body: dict[str, Any] = {
        "status": status,
        "version": version(),
        "uptime_seconds": round(time.time() - started_at, 3),
        "checks": checks,
    }
    if worker is not None:
        body["worker"] = worker
    return (200 if status == "ok" else 503), body


# --- the worker's wiring -------------------------------------------------------------------

_current: WorkerHealth | None = None


def current() -> WorkerHealth | None:
    """This worker's health (``None`` outside a worker)."""
    return _current


def on_worker_init(sender: Any, settings: Settings) -> None:
    """At ``worker_init`` (main process, before the pool forks; called by the platform's
    receiver, :mod:`synth_workers.install`): health state and metrics."""
    global _current
    name = str(getattr(sender, "hostname", None) or socket.gethostname())
    _current = WorkerHealth(name, settings.health_interval, settings.heartbeat_file)
    if settings.metrics_port:
        metrics.enable_worker_metrics(settings.prometheus_multiproc_dir, name, settings.gpu_metrics)


def on_worker_shutdown() -> None:
    """At ``worker_shutdown`` (after the pool stopped): the worker's metric files go."""
    metrics.disable_worker_metrics()


class Reporter:
    """Main-process thread: dependency checks and the Redis heartbeat, once per interval."""

    def __init__(self, app: Platform, health: WorkerHealth) -> None:
        self.app = app
        self.health = health
        self.checks = DependencyChecks(app)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="synth-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        try:
            self.app.redis.delete(worker_key(self.health.name))
        except Exception:
            log.debug("could not remove the worker's heartbeat key", exc_info=True)

    def _run(self) -> None:
        interval = self.health.interval
        while not self._stop.is_set():
            try:
                self.checks.refresh()
                info = self.health.info()
                if info["ready"]:
                    self.app.redis.set(
                        worker_key(self.health.name),
                        json.dumps(info),
                        px=max(1000, int(interval * 3000)),
                    )
            except Exception:
                log.warning("health report failed", exc_info=True)
            self._stop.wait(interval)

    def document(self) -> Response:
        code, body = health_document(
            self.checks.results(), self.health.started_at, self.health.info()
        )
        return json_response(code, body)


def _probe(check: Callable[[], tuple[bool, str]]) -> Callable[[], Response]:
    def serve() -> Response:
        ok, reason = check()
        return json_response(200 if ok else 503, {"status": "ok" if ok else "fail",
                                                  "reason": reason})  # fmt: skip

    return serve


class OpsStep(bootsteps.StartStopStep):
    """Worker bootstep: the metrics/health HTTP server and the reporter thread."""

    label = "synth-ops"
    #: After the pool forked (see :class:`synth_workers.ledger.sweeper.SweeperStep`).
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.server: OpsServer | None = None
        self.reporter: Reporter | None = None

    def start(self, parent: Any) -> None:
        health = _current
        app = parent.app
        if health is None:
            return
        platform = platform_of(app)
        self.reporter = Reporter(platform, health)
        self.reporter.start()
        settings = platform.settings
        if not settings.metrics_port:
            return
        routes = {
            "/metrics": metrics_response(metrics.worker_registry),
            "/live": _probe(health.live),
            "/ready": _probe(health.ready),
            "/health": self.reporter.document,
        }
        try:
            self.server = OpsServer(settings.metrics_address, settings.metrics_port, routes)
        except OSError as exc:
            log.error(
                "metrics/health server not started on %s:%s (SYNTH_METRICS_ADDRESS/"
                "SYNTH_METRICS_PORT): %s",
                settings.metrics_address,
                settings.metrics_port,
                exc,
            )
            return
        self.server.start()
        log.info("metrics and health on http://%s:%s", self.server.address, self.server.port)

    def stop(self, parent: Any) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.reporter is not None:
            self.reporter.stop()
            self.reporter = None

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)


class HeartbeatStep(bootsteps.StartStopStep):
    """Consumer bootstep: beat on the worker's timer while the consumer consumes."""

    label = "synth-heartbeat"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    @staticmethod
    def _queues(c: Any) -> list[str]:
        consumer = getattr(c, "task_consumer", None)
        if consumer is None:
            return []
        return sorted(q.name for q in getattr(consumer, "queues", ()) or ())

    def tick(self, c: Any) -> None:
        health = _current
        if health is not None:
            health.beat(self._queues(c))

    def start(self, c: Any) -> None:
        health = _current
        if health is None:
            return
        self.tick(c)
        self.tref = c.timer.call_repeatedly(health.interval, self.tick, (c,), priority=10)

    def stop(self, c: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        health = _current
        if health is not None:
            health.stopped()

    def shutdown(self, c: Any) -> None:
        self.stop(c)
