"""Flower with our app: `celery -A synth_workers flower`, basic auth required, its API shows
our workers and tasks."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from synth_workers import enqueue

from .conftest import ROOT, http_json, stop_group, wait_until
from .test_ops_metrics import free_port

QUEUE = "ops-flower"
USER, PASSWORD = "ops", "flower-test-pw"


def api(url: str, auth: tuple[str, str] | None = (USER, PASSWORD)) -> tuple[int, Any]:
    return http_json(url, auth)


def _flower_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env.pop("SYNTH_FLOWER_PASSWORD", None)
    env.update(extra)
    return env


@pytest.fixture
def flower() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "synth_workers", "flower", f"--port={port}"],
        cwd=ROOT,
        env=_flower_env(SYNTH_FLOWER_USER=USER, SYNTH_FLOWER_PASSWORD=PASSWORD),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: api(f"{base}/api/workers", None)[0] != 0, timeout=60)
        yield base, proc
    finally:
        stop_group(proc)


def test_flower_requires_auth_and_shows_our_workers_and_tasks(
    rclient: Any, start_worker: Any, flower: tuple[str, subprocess.Popen[bytes]]
) -> None:
    base, proc = flower
    worker = start_worker(QUEUE)
    # basic auth is required, with the password from settings
    assert api(f"{base}/api/workers", None)[0] == 401
    assert api(f"{base}/api/workers", (USER, "wrong"))[0] == 401
    # bound to 127.0.0.1 only (SYNTH_FLOWER_ADDRESS's default)
    listening = {
        c.laddr.ip
        for c in psutil.Process(proc.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening == {"127.0.0.1"}, listening

    def worker_listed() -> bool:
        status, body = api(f"{base}/api/workers?refresh=1")
        return status == 200 and worker.name in (body or {})

    assert wait_until(worker_listed, timeout=30, interval=0.5)

    # Flower turns task events on in the workers itself (every few seconds): wait for it
    def first_seen() -> bool:
        handle = enqueue("tests.e2e_tasks.record", {"label": "probe"}, queue=QUEUE)
        handle.wait(timeout=30)
        return wait_until(lambda: handle.id in (api(f"{base}/api/tasks")[1] or {}), timeout=2)

    assert wait_until(first_seen, timeout=40, interval=0.1)

    ok = [enqueue("tests.e2e_tasks.record", {"label": f"f{i}"}, queue=QUEUE) for i in range(3)]
    bad = enqueue("tests.e2e_tasks.permanent", {"key": "flower-dead"}, queue=QUEUE)
    for handle in ok:
        handle.wait(timeout=30)

    def all_final() -> bool:
        tasks = api(f"{base}/api/tasks")[1] or {}
        return all(tasks.get(h.id, {}).get("state") in ("SUCCESS", "FAILURE") for h in [*ok, bad])

    assert wait_until(all_final, timeout=30, interval=0.5)
    tasks = api(f"{base}/api/tasks")[1]
    for handle in ok:
        assert tasks[handle.id]["name"] == "tests.e2e_tasks.record"
        assert tasks[handle.id]["state"] == "SUCCESS"
        assert tasks[handle.id]["worker"] == worker.name
    assert tasks[bad.id]["name"] == "tests.e2e_tasks.permanent"
    assert tasks[bad.id]["state"] == "FAILURE"
    # a job id of ours is Flower's task id: the ledger and Flower name the same job
    status, one = api(f"{base}/api/task/info/{ok[0].id}")
    assert status == 200 and one["uuid"] == ok[0].id


def test_flower_refuses_to_start_without_a_password() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "synth_workers", "flower", f"--port={free_port()}"],
        cwd=ROOT,
        env=_flower_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "SYNTH_FLOWER_PASSWORD" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/venv/bin/celery", "-A", "synth_workers", "flower"], True),
        (["/x/celery/__main__.py", "--app=synth_workers", "-b", "redis://", "flower"], True),
        (["/venv/bin/celery", "-A", "synth_workers", "worker", "-Q", "flower"], False),
        (["/venv/bin/celery", "-A", "flower", "worker"], False),
        (["/venv/bin/synth-workers", "flower"], False),
    ],
)
def test_flower_is_recognised_only_as_the_subcommand(argv: list[str], expected: bool) -> None:
    from synth_workers.flower import apply_flower_defaults, is_flower_command
    from synth_workers.settings import Settings

    assert is_flower_command(argv) is expected
    env: dict[str, str] = {}
    settings = Settings(flower_password="pw", flower_port=5999)
    assert apply_flower_defaults(settings, env, argv) is expected
    if expected:
        assert env == {
            "FLOWER_ADDRESS": "127.0.0.1",
            "FLOWER_PORT": "5999",
            "FLOWER_BASIC_AUTH": "admin:pw",
        }
    else:
        assert env == {}


def test_flower_options_given_explicitly_win() -> None:
    from synth_workers.flower import apply_flower_defaults
    from synth_workers.settings import Settings

    env = {"FLOWER_BASIC_AUTH": "me:mine"}
    argv = ["celery", "-A", "synth_workers", "flower", "--address=0.0.0.0", "--port=1234"]
    assert apply_flower_defaults(Settings(), env, argv)
    assert env == {"FLOWER_BASIC_AUTH": "me:mine"}
