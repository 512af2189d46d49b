"""`celery -A synth_workers worker|beat` as Celery users run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from synth_workers import JobState, Task, app, enqueue

from .conftest import ROOT, start_beat, stop_beat, wait_until


def test_user_module_with_I_gets_the_platform_task(rclient: Any, start_worker: Any) -> None:
    start_worker("email", "orchestration", "default", extra=("-I", "tests.user_tasks"))
    import tests.user_tasks as user_tasks

    assert isinstance(user_tasks.greet, Task)
    handle = enqueue("tests.user_tasks.greet", {"name": "ada"})
    assert handle.info()["queue"] == "default"
    assert handle.wait(timeout=30) == "hello ada"
    info = handle.info()
    assert info["state"] == JobState.SUCCEEDED
    assert info["attempt"] == 2


def test_every_registered_task_uses_the_platform_base() -> None:
    app.loader.import_default_modules()
    ours = [t for name, t in app.tasks.items() if not name.startswith("celery.")]
    assert ours
    assert all(isinstance(t, Task) for t in ours)


def test_beat_schedule_is_loaded() -> None:
    assert app.conf.beat_schedule["system-ping"]["task"] == "tasks.system.ping"


def test_beat_sends_periodic_jobs(rclient: Any, tmp_path: Path, start_worker: Any) -> None:
    start_worker("default")
    proc = start_beat(tmp_path / "beat-schedule")
    try:
        assert wait_until(lambda: int(rclient.get("test:count:beat") or 0) >= 2, timeout=30)
    finally:
        out = stop_beat(proc)
    assert "beat: Starting" in out, out
    # jobs sent by beat have ledger rows like any other
    beat_jobs = app.ledger.list_jobs(task="tests.e2e_tasks.side_effect")
    assert len(beat_jobs) >= 2
    assert all(job["priority"] == 8 for job in beat_jobs)


def test_beat_entry_with_args_runs(rclient: Any, tmp_path: Path, start_worker: Any) -> None:
    # tests.beat_fast's "test-fast-args": flaky("beat-args", 0), positional as Celery takes it
    start_worker("default")
    proc = start_beat(tmp_path / "beat-schedule")
    try:
        assert wait_until(lambda: int(rclient.get("test:count:beat-args") or 0) >= 1, timeout=30)
    finally:
        out = stop_beat(proc)
    assert "missing 2 required positional arguments" not in out, out
    jobs = app.ledger.list_jobs(task="tests.e2e_tasks.flaky")
    assert jobs
    assert all(job["args"] == ["beat-args", 0] for job in jobs)
    assert wait_until(
        lambda: any(
            j["state"] == JobState.SUCCEEDED
            for j in app.ledger.list_jobs(task="tests.e2e_tasks.flaky")
        ),
        timeout=30,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATABASE_URL": ""}, "DATABASE_URL is not set"),
        ({"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}, "Postgres is not reachable"),
        ({"SYNTH_DB_SCHEMA": "no_such_schema"}, "synth-workers db migrate"),
    ],
)
def test_worker_stops_at_start_naming_a_missing_ledger(env: dict[str, str], message: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "synth_workers",
            "worker",
            "-Q",
            "nothing",
            "-P",
            "solo",
            "--without-mingle",
            "--without-gossip",
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
