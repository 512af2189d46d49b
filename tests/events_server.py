"""``synth-workers events serve`` as a real process for the web tests (a fixed port when a
test restarts it, the environment a test gives)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, stop_group, wait_until

SECRET = "test-secret-for-the-events-server-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EventsServer:
    """One ``events serve`` process; :meth:`restart` brings it back on the same port."""

    def __init__(self, log_dir: Path, env: dict[str, str], port: int | None = None) -> None:
        self.log_dir = log_dir
        self.env = {**os.environ, "JWT_SECRET": SECRET, "SYNTH_EVENTS_HEARTBEAT": "0.5", **env}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.runs = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log = log_dir / "events-serve-0.log"

    def start(self) -> EventsServer:
        self.runs += 1
        self.log = self.log_dir / f"events-serve-{self.runs}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "synth_workers.cli",
                    "events",
                    "serve",
                    "--port",
                    str(self.port),
                ],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        process = self.process

        def listening() -> bool:
            return bool(re.search(r"listening on http://", self.output())) or (
                process.poll() is not None
            )

        assert wait_until(listening, timeout=60), self.output()
        assert process.poll() is None, self.output()
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def all_output(self) -> str:
        """Every run's output (what the server ever logged)."""
        return "".join(
            (self.log_dir / f"events-serve-{i}.log").read_text(errors="replace")
            for i in range(1, self.runs + 1)
        )

    def stop(self) -> int:
        """SIGTERM (a clean stop: exit 0); returns the exit status."""
        if self.process is None:
            return 0
        status = stop_group(self.process, timeout=20)
        self.process = None
        return status

    def restart(self) -> None:
        assert self.stop() == 0, self.output()
        self.start()
