"""The events server for web pages, over real HTTP against a real ``events serve`` process
(real Redis, real Postgres): the token as ``access_token`` (RFC 6750 §2.3) and never in a
log line, CORS from ``CORS_ORIGINS`` (preflight, ``Vary: Origin``, ``*`` without
credentials), and ``synth-workers events token``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

import tests.events_tasks  # noqa: F401 - registers the tasks on the app
from synth_workers import enqueue
from synth_workers.events import issue_token
from synth_workers.events.auth import take_query_token
from synth_workers.events.cors import CorsPolicy
from tests.conftest import ROOT
from tests.events_server import SECRET, EventsServer

STEPS = "tests.events_tasks.steps"
PAGE = "http://127.0.0.1:8080"
OTHER_PAGE = "https://dash.example.com"
STRANGER = "http://evil.example.net"


@pytest.fixture
def server(rclient: Any, tmp_path: Path) -> Iterator[EventsServer]:
    """``events serve`` with two listed origins and every request logged (LOG_LEVEL=DEBUG)."""
    started = EventsServer(
        tmp_path,
        {"CORS_ORIGINS": f"{PAGE}, {OTHER_PAGE}/", "LOG_LEVEL": "DEBUG"},
    ).start()
    yield started
    assert started.stop() == 0, started.output()
    assert "Traceback" not in started.output(), started.output()


def first_bytes(client: httpx.Client, url: str, **kwargs: Any) -> tuple[int, dict[str, str], str]:
    """Status, headers and the start of the body (an event stream is not read to its end)."""
    with client.stream("GET", url, **kwargs) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            return r.status_code, dict(r.headers), next(r.iter_lines())
        return r.status_code, dict(r.headers), r.read().decode()


# --- the token in the query string -------------------------------------------------------
def test_access_token_query_parameter_works_and_never_reaches_a_log(server: EventsServer) -> None:
    mine = enqueue(STEPS, {"n": 1}, user_id="uma")  # queued: no worker
    url = f"{server.url}/events"
    good = issue_token(SECRET, "uma")
    stranger = issue_token(SECRET, "victor")
    forged = issue_token("another-secret-another-secret-another-secret", "uma")
    with httpx.Client(timeout=10) as client:
        # the query form opens the same stream as the header form
        for params, headers in [
            ({"job": mine.id, "access_token": good}, {}),
            ({"job": mine.id}, {"Authorization": f"Bearer {good}"}),
            ({"user": "uma", "access_token": good}, {}),
        ]:
            status, answer, first = first_bytes(client, url, params=params, headers=headers)
            assert status == 200, (params, first)
            assert first == "retry: 2000"
        for params, headers, expected in [
            ({"job": mine.id, "access_token": forged}, {}, 401),
            ({"job": mine.id, "access_token": ""}, {}, 401),
            ({"job": mine.id, "access_token": stranger}, {}, 403),
            ({"user": "uma", "access_token": stranger}, {}, 403),
            # one method per request (RFC 6750 §2): both forms, or the parameter twice
            ({"job": mine.id, "access_token": good}, {"Authorization": f"Bearer {good}"}, 400),
            ([("job", mine.id), ("access_token", good), ("access_token", good)], {}, 400),
        ]:
            status, answer, body = first_bytes(client, url, params=params, headers=headers)
            assert status == expected, (params, status, body)
            assert json.loads(body)["error"]
            assert answer["cache-control"] == "no-store"
        assert json.loads(first_bytes(client, url, params={"access_token": good})[2]) == {
            "error": "give ?job=ID or ?user=ID"
        }
    assert server.stop() == 0
    logs = server.output()
    # every request above was logged (DEBUG: 200s too), none with a token in it
    assert logs.count("GET /events?") >= 10, logs
    assert "access_token=[REDACTED]" in logs, logs
    for token in (good, stranger, forged):
        for part in token.split("."):
            assert part not in logs, f"a token's {part[:10]}... is in the log:\n{logs}"


def test_take_query_token_leaves_nothing_of_it_in_the_request() -> None:
    host = HTTPHeaders({"Host": "127.0.0.1"})
    token = issue_token(SECRET, "uma")
    uri = f"/events?job=j-1&access%5Ftoken={token}&since=0"
    request = HTTPServerRequest(start_line=RequestStartLine("GET", uri, "HTTP/1.1"), headers=host)
    assert take_query_token(request) == [token]
    assert token not in request.uri
    assert token not in repr(request)  # what an uncaught exception's log line prints
    assert request.uri == "/events?job=j-1&access_token=[REDACTED]&since=0"
    assert "access_token" not in request.query_arguments
    assert request.query_arguments["since"] == [b"0"]
    plain = HTTPServerRequest(
        start_line=RequestStartLine("GET", "/events?job=j-1", "HTTP/1.1"), headers=host
    )
    assert take_query_token(plain) == []
    assert plain.uri == "/events?job=j-1"


# --- CORS ----------------------------------------------------------------------------------
def test_cors_only_listed_origins_preflight_and_vary(server: EventsServer) -> None:
    url = f"{server.url}/events"
    token = issue_token(SECRET, "wendy")
    with httpx.Client(timeout=10) as client:
        for origin in (PAGE, OTHER_PAGE):  # listed ("https://dash.example.com/" as written)
            r = client.get(f"{server.url}/health", headers={"Origin": origin})
            assert r.headers["access-control-allow-origin"] == origin
            assert r.headers["access-control-allow-credentials"] == "true"
            assert "Origin" in r.headers["vary"]
            # errors too, so that a page can tell why it was refused
            r = client.get(url, params={"user": "wendy"}, headers={"Origin": origin})
            assert r.status_code == 401
            assert r.headers["access-control-allow-origin"] == origin
        for origin in (STRANGER, "http://127.0.0.1:8081", "null"):
            r = client.get(f"{server.url}/health", headers={"Origin": origin})
            assert r.status_code == 200
            assert "access-control-allow-origin" not in r.headers
            assert "access-control-allow-credentials" not in r.headers
            assert "Origin" in r.headers["vary"]
        assert "access-control-allow-origin" not in client.get(f"{server.url}/health").headers
        status, headers, _ = first_bytes(
            client, url, params={"user": "wendy", "access_token": token}, headers={"Origin": PAGE}
        )
        assert (status, headers["access-control-allow-origin"]) == (200, PAGE)

        def preflight(origin: str, method: str = "GET", asked: str = "") -> httpx.Response:
            headers = {"Origin": origin, "Access-Control-Request-Method": method}
            if asked:
                headers["Access-Control-Request-Headers"] = asked
            return client.options(url, headers=headers)

        r = preflight(PAGE, asked="Authorization, Last-Event-ID")
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == PAGE
        assert r.headers["access-control-allow-credentials"] == "true"
        assert "GET" in r.headers["access-control-allow-methods"]
        assert r.headers["access-control-allow-headers"] == "authorization, last-event-id"
        assert int(r.headers["access-control-max-age"]) > 0
        assert "Origin" in r.headers["vary"]
        for refused, why in [
            (preflight(STRANGER, asked="authorization"), "CORS_ORIGINS"),
            (preflight(PAGE, method="DELETE"), "DELETE"),
            (preflight(PAGE, asked="authorization, x-secret"), "x-secret"),
        ]:
            assert refused.status_code == 403
            assert why in refused.json()["error"]
            assert "access-control-allow-origin" not in refused.headers
            assert "Origin" in refused.headers["vary"]


def test_cors_any_origin_is_a_wildcard_without_credentials(rclient: Any, tmp_path: Path) -> None:
    server = EventsServer(tmp_path, {"CORS_ORIGINS": "*"}).start()
    try:
        with httpx.Client(timeout=10) as client:
            for origin in (PAGE, STRANGER):
                r = client.get(f"{server.url}/health", headers={"Origin": origin})
                assert r.headers["access-control-allow-origin"] == "*"
                assert "access-control-allow-credentials" not in r.headers
                r = client.options(
                    f"{server.url}/events",
                    headers={
                        "Origin": origin,
                        "Access-Control-Request-Method": "GET",
                        "Access-Control-Request-Headers": "authorization",
                    },
                )
                assert r.status_code == 204
                assert r.headers["access-control-allow-origin"] == "*"
                assert "access-control-allow-credentials" not in r.headers
    finally:
        assert server.stop() == 0, server.output()


def test_cors_policy_unset_answers_no_origin() -> None:
    policy = CorsPolicy(())
    assert policy.headers(PAGE) == {}
    assert policy.preflight(PAGE, "GET", "authorization")[0] == 403
    listed = CorsPolicy([PAGE])
    assert listed.headers(None) == {"Vary": "Origin"}
    assert listed.headers(PAGE + "/") == {"Vary": "Origin"}  # browsers send no slash


@pytest.mark.parametrize(
    "value",
    ["ftp://files.example.com", "http://a.example/path", "*, http://a.example", "http://:80"],
)
def test_serve_refuses_a_bad_cors_origins(rclient: Any, value: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "synth_workers.cli", "events", "serve", "--port", "0"],
        cwd=ROOT,
        env={**os.environ, "JWT_SECRET": SECRET, "CORS_ORIGINS": value},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "CORS_ORIGINS" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "listening" not in proc.stdout


# --- synth-workers events token ------------------------------------------------------------
def events_cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "JWT_SECRET"}
    return subprocess.run(
        [sys.executable, "-m", "synth_workers.cli", "events", *args],
        cwd=ROOT,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_events_token_cli_prints_a_token_the_server_takes(server: EventsServer) -> None:
    out = events_cli("token", "xena", "--ttl", "120", JWT_SECRET=SECRET)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "xena"
    assert 110 <= claims["exp"] - time.time() <= 120
    default = jwt.decode(
        events_cli("token", "xena", JWT_SECRET=SECRET).stdout.strip(),
        SECRET,
        algorithms=["HS256"],
    )
    assert 3590 <= default["exp"] - time.time() <= 3600
    with httpx.Client(timeout=10) as client:
        params = {"user": "xena", "access_token": token}
        assert first_bytes(client, f"{server.url}/events", params=params)[0] == 200


def test_events_token_cli_refuses_clearly() -> None:
    missing = events_cli("token", "xena")
    assert missing.returncode == 2
    assert "JWT_SECRET" in missing.stderr
    short = events_cli("token", "xena", JWT_SECRET="s" * 31)
    assert short.returncode == 2
    assert "32" in short.stderr
    for ttl in ("0", "-5", "nan", "86401"):
        out = events_cli("token", "xena", "--ttl", ttl, JWT_SECRET=SECRET)
        assert out.returncode == 2, (ttl, out.stdout)
        assert "--ttl" in out.stderr
        assert out.stdout == ""
    empty = events_cli("token", " ", JWT_SECRET=SECRET)
    assert empty.returncode == 2
    assert "USER" in empty.stderr
    for out in (missing, short, empty):
        assert "Traceback" not in out.stderr
