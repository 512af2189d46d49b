"""A Postgres primary and a streaming read replica the tests start themselves.

Debian's Postgres binaries (``pg_config --bindir``); ``initdb`` and the servers run as the
``postgres`` user when the tests run as root. The replica is made with ``pg_basebackup -R``
(standby.signal and primary_conninfo written by it) and logs every statement with the
session's ``application_name`` (``log_statement=all``, ``log_connections=on``), so a test
can say which sessions, and which statements, reached it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

#: Every log line starts with the session's application_name and a bar.
LOG_PREFIX = "%a|"
#: application_name of the tests' own sessions (told apart from the platform's in the log).
PROBE = "synth-test-probe"


def bindir() -> Path:
    out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def _as_postgres(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


class Server:
    """One Postgres server (data folder, port, log file)."""

    def __init__(self, data: Path, port: int, log: Path, extra: list[str]) -> None:
        self.data = data
        self.port = port
        self.log = log
        self.extra = extra

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.data}",
                *self.extra,
            ]
        )
        subprocess.run(
            _as_postgres(
                [
                    str(bindir() / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-o",
                    options,
                    "-l",
                    str(self.log),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            ),
            check=True,
            capture_output=True,
        )

    def stop(self, mode: str = "fast") -> None:
        subprocess.run(
            _as_postgres(
                [str(bindir() / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]
            ),
            capture_output=True,
        )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


class ReplicatedPostgres:
    """A primary on ``port`` and its streaming replica on ``port + 1``."""

    def __init__(self, port: int) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="synth-replica-test-"))
        os.chmod(self.base, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.base, "postgres", "postgres")
        self.primary = Server(self.base / "primary", port, self.base / "primary.log", [])
        self.replica = Server(
            self.base / "replica",
            port + 1,
            self.base / "replica.log",
            [
                "-c log_statement=all",
                "-c log_connections=on",
                f"-c log_line_prefix='{LOG_PREFIX}'",
                "-c hot_standby_feedback=on",
            ],
        )

    def start(self) -> None:
        subprocess.run(
            _as_postgres(
                [
                    str(bindir() / "initdb"),
                    "-D",
                    str(self.primary.data),
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )
        self.primary.start()
        subprocess.run(
            _as_postgres(
                [
                    str(bindir() / "pg_basebackup"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.primary.port),
                    "-U",
                    "postgres",
                    "-D",
                    str(self.replica.data),
                    "-R",
                    "-X",
                    "stream",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )
        self.replica.start()
        self.wait_streaming()

    def wait_streaming(self, timeout: float = 30) -> None:
        """Until the primary has a streaming WAL sender to the replica."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with psycopg.connect(self.primary.url, autocommit=True, application_name=PROBE) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
                ).fetchone()
            if row and row[0]:
                return
            time.sleep(0.1)
        raise RuntimeError(f"the replica is not streaming:\n{self.replica.log_text()[-3000:]}")

    def wait_caught_up(self, timeout: float = 30) -> None:
        """Until the replica has replayed everything the primary wrote so far."""
        with psycopg.connect(self.primary.url, autocommit=True, application_name=PROBE) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
        assert row is not None
        target = row[0]
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.replica.url, autocommit=True, application_name=PROBE) as conn:
            while time.monotonic() < deadline:
                done = conn.execute(
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (target,)
                ).fetchone()
                if done and done[0]:
                    return
                time.sleep(0.05)
        raise RuntimeError("the replica did not catch up")

    def close(self) -> None:
        self.replica.stop("immediate")
        self.primary.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)
