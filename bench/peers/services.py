"""The benchmark's own services: a private ``redis-server`` and its probe of the ledger."""

from __future__ import annotations

import contextlib
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from typing import Any

PORT_RANGE = range(16300, 16400)
LEDGER_TABLES = ("synth_jobs", "synth_idempotency", "synth_effects", "synth_late_completions")


class ServiceError(RuntimeError):
    """A service the benchmark needs is missing or would not start (the message says which
    and how to get it)."""


def free_port(ports: range = PORT_RANGE, skip: set[int] | None = None) -> int:
    """The first port of ``ports`` nothing listens on (and not in ``skip``)."""
    for port in ports:
        if skip and port in skip:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ServiceError(f"no free port in {ports.start}-{ports.stop - 1}; pass --redis-port")


class RedisMissingError(ServiceError):
    """No ``redis-server`` binary to start."""


class RedisServer:
    """Debian's ``redis-server`` on 127.0.0.1:``port``, no persistence, in a temporary folder."""

    def __init__(self, port: int) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisMissingError(
                "redis-server is not installed (the benchmark starts a private one): "
                "`apt-get install redis-server`, or put its folder on PATH"
            )
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="synth-peers-redis-")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.dir,
                "--logfile",
                f"{self.dir}/redis.log",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise ServiceError(
                        f"redis-server did not start on port {port} (see {self.dir}/redis.log)"
                    ) from None
                time.sleep(0.05)
        self.version = str(client.info("server")["redis_version"])
        client.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class Ledger:
    """The harness's own connection to the platform's ledger schema (plain SQL)."""

    def __init__(self, database_url: str, schema: str) -> None:
        import psycopg

        try:
            self.conn: Any = psycopg.connect(
                database_url, autocommit=True, options=f"-c search_path={schema}"
            )
        except psycopg.OperationalError as exc:
            raise ServiceError(
                f"Postgres is not reachable at --database-url: {' '.join(str(exc).split())}. "
                "Start one (`synth-workers dev` for the embedded stack) or pass --database-url"
            ) from None

    def reset(self) -> None:
        self.conn.execute("TRUNCATE " + ", ".join(LEDGER_TABLES))

    def unfinished(self) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM synth_jobs WHERE state <> 'succeeded'"
        ).fetchone()
        return int(row[0]) if row else 0

    def states(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT state, count(*) FROM synth_jobs GROUP BY state").fetchall()
        return {str(state): int(count) for state, count in rows}

    def commit_ms(self, n: int = 50) -> float:
        """Median milliseconds of a one-row INSERT with its commit (a table of its own,
        dropped after): what each durable enqueue waits for at least, on this machine now."""
        self.conn.execute("CREATE TABLE IF NOT EXISTS bench_peers_commit_probe (x int)")
        took = []
        try:
            for _ in range(n):
                t = time.perf_counter()
                self.conn.execute("INSERT INTO bench_peers_commit_probe VALUES (1)")
                took.append(time.perf_counter() - t)
        finally:
            self.conn.execute("DROP TABLE bench_peers_commit_probe")
        return statistics.median(took) * 1000

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()
