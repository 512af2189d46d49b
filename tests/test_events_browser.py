"""The example page ``docs/examples/job-progress.html`` in a real headless Chromium (Debian's
``chromium``, driven by playwright; no browser of playwright's own), following a real job
run by a real worker process, through a real ``events serve`` on another origin, with real
Redis and Postgres.

One job, three pages: the job's user's page on an origin listed in ``CORS_ORIGINS`` sees
every event in order, none twice, across a restart of the events server mid-job (the
browser resumes with ``Last-Event-ID``); a page holding another user's token, and a page on
an origin not listed, see nothing of it.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import tests.events_tasks  # noqa: F401 - registers the tasks on the app
from synth_workers import enqueue
from synth_workers.events import Event, issue_token, job_stream
from tests.conftest import ROOT, wait_until
from tests.events_server import SECRET, EventsServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
EXAMPLES = ROOT / "docs" / "examples"
INCLUDE = {"SYNTH_INCLUDE": "tests.e2e_tasks,tests.events_tasks"}
GATED = "tests.events_tasks.gated"
#: Milliseconds the browser may take for each thing the test waits on.
WAIT_MS = 60_000

if not Path(CHROMIUM).exists():
    pytest.skip(
        "chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]'")


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def origins() -> Iterator[tuple[str, str]]:
    """Two static servers of docs/examples, on two ports: two origins, neither the events
    server's. The first is listed in CORS_ORIGINS, the second not."""
    handler = functools.partial(Quiet, directory=str(EXAMPLES))
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tuple(f"http://127.0.0.1:{s.server_address[1]}" for s in servers)  # type: ignore[misc]
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


def cli_token(user: str, ttl: int = 600) -> str:
    """A token as the README says to get one: ``synth-workers events token USER --ttl``."""
    out = subprocess.run(
        [sys.executable, "-m", "synth_workers.cli", "events", "token", user, "--ttl", str(ttl)],
        cwd=ROOT,
        env={**os.environ, "JWT_SECRET": SECRET},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def stored(rclient: Any, job_id: str) -> list[Event]:
    entries = rclient.xrange(job_stream(job_id), "-", "+")
    return [Event.from_entry(i, f) for i, f in entries]


class Page:
    """A browser tab on the example page, with the event-stream requests it made."""

    def __init__(self, browser: Any, origin: str, server: str, job: str, token: str) -> None:
        self.page = browser.new_page()
        self.requests: list[Any] = []
        self.statuses: list[int] = []

        def request(r: Any) -> None:
            if r.resource_type == "eventsource":
                self.requests.append(r)

        def response(r: Any) -> None:
            if r.request.resource_type == "eventsource":
                self.statuses.append(r.status)

        self.page.on("request", request)
        self.page.on("response", response)
        self.page.goto(f"{origin}/job-progress.html?server={server}&job={job}#token={token}")

    def events(self) -> list[dict[str, Any]]:
        return list(self.page.evaluate("window.jobEvents"))

    def wait(self, script: str, arg: Any = None) -> None:
        self.page.wait_for_function(script, arg=arg, timeout=WAIT_MS)

    def wait_progress(self, current: int) -> None:
        self.wait(
            "n => window.jobEvents.some(e => e.kind === 'progress' && e.data.current === n)",
            current,
        )

    def wait_state(self, state: str) -> None:
        self.wait("s => document.getElementById('state').dataset.state === s", state)

    def text(self, selector: str) -> str:
        return str(self.page.text_content(selector))


@pytest.fixture
def server(rclient: Any, origins: tuple[str, str], tmp_path: Path) -> Iterator[EventsServer]:
    """``events serve`` whose CORS_ORIGINS lists the first origin only; stopped after the
    test whatever happens in it."""
    started = EventsServer(tmp_path, {"CORS_ORIGINS": origins[0]}).start()
    yield started
    started.stop()


def test_job_progress_page_live_across_origins_and_an_events_server_restart(
    rclient: Any,
    start_worker: Any,
    origins: tuple[str, str],
    browser: Any,
    server: EventsServer,
) -> None:
    listed, unlisted = origins
    gate = f"test-gate-{uuid.uuid4().hex}"
    handle = enqueue(GATED, {"n": 10, "pauses": [4, 7], "gate": gate}, user_id="alice")
    alice_token = cli_token("alice")

    alice = Page(browser, listed, server.url, handle.id, alice_token)
    mallory = Page(browser, listed, server.url, handle.id, issue_token(SECRET, "mallory"))
    elsewhere = Page(browser, unlisted, server.url, handle.id, alice_token)
    alice.wait("() => window.jobEvents.length >= 1")  # queued, before any worker runs
    assert [e["kind"] for e in alice.events()] == ["queued"]
    assert alice.text("#state") == "queued"

    start_worker("default", env=INCLUDE)
    alice.wait_progress(4)  # the job waits at the gate after step 4
    assert alice.page.evaluate(
        "(() => { const b = document.getElementById('bar'); return [b.value, b.max]; })()"
    ) == [4, 10]
    assert alice.text("#percent") == "40%"
    assert alice.text("#message") == "step 4"
    assert alice.text("#state") == "running"

    # the events server goes away mid-job; the job goes on (steps 5..7) while it is away
    assert server.stop() == 0, server.output()
    assert handle.state().value == "running"
    alice.wait("() => document.getElementById('connection').textContent === 'reconnecting'")
    rclient.rpush(gate, 1)
    assert wait_until(
        lambda: any(
            e.kind == "progress" and e.data["current"] == 7 for e in stored(rclient, handle.id)
        ),
        timeout=60,
    )
    seen_before_restart = alice.events()
    assert [e["data"].get("current") for e in seen_before_restart][-1] == 4
    server.start()  # the same port; the page reconnects by itself
    alice.wait_progress(7)  # 5, 6, 7 were written while the server was down
    assert handle.state().value == "running"  # still mid-job
    rclient.rpush(gate, 1)
    alice.wait_state("succeeded")

    # the page saw every event of the job, in order, none twice
    events = alice.events()
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), f"an event arrived twice: {ids}"
    assert ids == [e.id for e in stored(rclient, handle.id)], "the page missed an event"
    assert [e["kind"] for e in events] == [
        "queued",
        "started",
        *["progress"] * 10,
        "succeeded",
    ]
    assert [e["data"]["current"] for e in events if e["kind"] == "progress"] == list(range(1, 11))
    assert alice.text("#percent") == "100%"
    assert alice.text("#connection") == "closed"
    # it resumed: a second stream, asked from the last event it had before the restart
    assert alice.page.evaluate("window.jobStreamOpens") >= 2
    resumed = [r.all_headers().get("last-event-id") for r in alice.requests]
    assert resumed[0] is None
    assert seen_before_restart[-1]["id"] in resumed, resumed
    assert handle.wait(timeout=30) == 10

    # another user's token, and an origin not in CORS_ORIGINS: nothing of the job
    mallory.wait_state("refused")
    elsewhere.wait_state("refused")
    for page in (mallory, elsewhere):
        assert page.events() == []
        assert page.page.evaluate("document.querySelectorAll('#log li').length") == 0
        assert page.text("#connection") == "closed"
    assert 403 in mallory.statuses
    assert 200 not in mallory.statuses

    assert server.stop() == 0, server.output()
    logs = server.all_output()
    assert "Traceback" not in logs, logs
    assert alice_token not in logs  # it came as ?access_token= on every request
