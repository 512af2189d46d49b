"""The embedded stack: `synth-workers demo` and `synth-workers dev` as a user runs them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from synth_workers import JobState, Settings, create_app, enqueue

from .conftest import http_json

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "synth_workers.cli"]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "DATABASE_URL", "QDRANT_URL", "SYNTH_INCLUDE", "SYNTH_DB_SCHEMA")
    }
    env.update(extra)
    return env


def test_demo_runs_one_job_of_each_kind_and_exits_0(tmp_path: Path) -> None:
    env = _clean_env(SYNTH_DEV_DIR=str(tmp_path / "dev"))
    proc = subprocess.run(
        [*CLI, "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(embedded Valkey)" in proc.stdout
    assert "(embedded pgserver)" in proc.stdout
    assert re.search(r"ok +email \(welcome\): succeeded", proc.stdout), proc.stdout
    assert re.search(r"ok +system ping: succeeded", proc.stdout), proc.stdout
    # one document indexed by the local model into Qdrant's local folder
    assert re.search(r'ok +embeddings \(local\): succeeded -> .*"points": 1', proc.stdout), (
        proc.stdout
    )
    assert "skipped   orchestration: no LLM configured" in proc.stdout
    # progress while it waits: each job's states as they change
    assert re.search(r"^waiting +email \(welcome\): (queued|running) \(\d+s\)$", proc.stdout, re.M)
    assert re.search(r"^waiting +system ping: succeeded \(\d+s\)$", proc.stdout, re.M)
    # where things were: paths that still exist once it has exited; no dead Flower password
    kept = tmp_path / "dev" / "demo"
    assert f"outbox    1 message(s) kept in {kept / 'outbox'}" in proc.stdout
    assert len(list((kept / "outbox").glob("*.eml"))) == 1
    assert f"logs      {kept / 'logs'}" in proc.stdout
    assert (kept / "logs" / "worker-main.log").stat().st_size > 0
    paths = re.findall(r"(?:^|\s|=)(/[^\s)]+)", proc.stdout, re.M)
    assert paths
    for path in paths:
        assert Path(path).exists(), path
    assert "password" not in proc.stdout and "flower" not in proc.stdout
    assert proc.stdout.rstrip().endswith("demo succeeded")


def test_demo_uses_configured_services_instead_of_embedded(
    redis_url: str, database_url: str, tmp_path: Path
) -> None:
    env = _clean_env(
        REDIS_URL=redis_url, DATABASE_URL=database_url, SYNTH_DEV_DIR=str(tmp_path / "dev")
    )
    proc = subprocess.run(
        [*CLI, "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^redis +\S+ \(REDIS_URL\)$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^postgres +\S+ \(DATABASE_URL\)", proc.stdout, re.M), proc.stdout
    assert "embedded" not in proc.stdout.split("qdrant")[0]


def test_dev_names_an_unreachable_service(tmp_path: Path) -> None:
    port = 1  # nothing listens there
    proc = subprocess.run(
        [*CLI, "dev", "--dir", str(tmp_path)],
        cwd=ROOT,
        env=_clean_env(REDIS_URL=f"redis://127.0.0.1:{port}/0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3
    assert "Redis at redis://127.0.0.1:1/0 (REDIS_URL) is not reachable" in proc.stderr
    assert "Traceback" not in proc.stderr


def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line.rstrip("\n"))
        if line.startswith(marker):
            return lines
    raise AssertionError(f"no {marker!r} line; got:\n" + "\n".join(lines))


def test_dev_runs_until_ctrl_c_and_leaves_nothing_behind(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*CLI, "dev", "--dir", str(tmp_path / "dev")],
        cwd=ROOT,
        env=_clean_env(SYNTH_MAIL_OUTBOX=str(tmp_path / "outbox")),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = _read_until(proc, "ready", timeout=120)
        text = "\n".join(lines)
        redis_url = re.search(r"^redis +(\S+) \(embedded Valkey\)", text, re.M)
        database_url = re.search(r"^postgres +(\S+) \(embedded pgserver\)", text, re.M)
        assert database_url, text
        flower = re.search(r"^flower +(\S+) \(user (\S+), password (\S+) ", text, re.M)
        assert redis_url and flower, text
        assert flower.group(1).startswith("http://127.0.0.1:")

        # workers process real jobs
        app = create_app(
            Settings(
                redis_url=redis_url.group(1), database_url=database_url.group(1), db_schema="synth"
            )
        )
        handle = enqueue("tasks.system.ping", {}, app=app)
        assert handle.wait(timeout=30)["reply"] == "pong"
        assert handle.state() is JobState.SUCCEEDED
        app.close()

        # Flower: auth required, and its API shows our workers
        base, user, password = flower.groups()
        assert http_json(f"{base}/api/workers")[0] == 401
        names: set[str] = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not {"main", "embeddings"} <= names:
            status, body = http_json(f"{base}/api/workers?refresh=1", (user, password))
            assert status == 200
            names = {name.split("@")[0] for name in (body or {})}
            time.sleep(0.5)
        assert {"main", "embeddings"} <= names

        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert len(descendants) >= 5  # 2 workers (+ pool children), beat, flower, services
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=90) == 0
        rest = proc.stdout.read() if proc.stdout else ""
        assert "stopped" in rest
        alive = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert alive == [], [p.cmdline() for p in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("var", "value"), [("SYNTH_MAX_ATTEMPTS", "many"), ("REDIS_URL", "http://127.0.0.1:6379")]
)
def test_dev_refuses_a_wrong_setting_naming_it(var: str, value: str) -> None:
    proc = subprocess.run(
        [*CLI, "dev"],
        cwd=ROOT,
        env=_clean_env(**{var: value}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert var in proc.stderr
    assert "Traceback" not in proc.stderr
