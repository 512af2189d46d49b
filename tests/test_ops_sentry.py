"""Sentry is optional: nothing imported without SENTRY_DSN; with it, a worker reports a
failed job through the Celery integration, redacted."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from synth_workers import JobFailedError, enqueue

from .conftest import ROOT, wait_until


def test_nothing_is_imported_without_a_dsn() -> None:
    code = (
        "import sys; from synth_workers.sentry import init_sentry; "
        "from synth_workers import Settings; "
        "assert init_sentry(Settings()) is False; "
        "assert 'sentry_sdk' not in sys.modules, 'imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def sentry_server() -> Iterator[tuple[str, list[bytes]]]:
    received: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            received.append(body)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://publickey@127.0.0.1:{server.server_address[1]}/1", received
    server.shutdown()
    server.server_close()


def test_a_failed_job_reaches_sentry_redacted(
    rclient: Any, start_worker: Any, sentry_server: tuple[str, list[bytes]]
) -> None:
    dsn, received = sentry_server
    start_worker("ops-sentry", env={"SENTRY_DSN": dsn, "SENTRY_TRACES_SAMPLE_RATE": "0"})
    handle = enqueue(
        "tests.e2e_tasks.permanent", {"key": "sentry-password=hunter2"}, queue="ops-sentry"
    )
    with pytest.raises(JobFailedError):
        handle.wait(timeout=30)

    def events() -> list[dict[str, Any]]:
        found = []
        for body in list(received):
            for line in body.splitlines():
                item = json.loads(line) if line.strip().startswith(b"{") else {}
                if item.get("exception"):
                    found.append(item)
        return found

    assert wait_until(lambda: bool(events()), timeout=20), received
    event = events()[0]
    text = json.dumps(event)
    assert event["exception"]["values"][-1]["type"] == "PermanentError"
    assert "tests.e2e_tasks.permanent" in text
    assert all(b"hunter2" not in body for body in received)
