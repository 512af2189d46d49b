"""Beat's liveness: its scheduler loop writes a heartbeat, ``synth-workers health beat`` reads it.

A real ``celery -A synth_workers beat`` (the default schedule, whose entries are a minute or
more apart, and Celery's default 300 s max interval) with SYNTH_HEALTH_INTERVAL=1: the loop
must still turn every second. SIGSTOP freezes it as a hang would; the probe must fail within
two intervals, and pass again after SIGCONT.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from synth_workers.clikit import ExitCode
from synth_workers.heartbeat import read_heartbeat
from tests.conftest import ROOT, wait_until

INTERVAL = 1.0


def _probe(heartbeat: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "synth_workers.cli", "health", "beat", *extra],
        cwd=ROOT,
        env={
            **os.environ,
            "SYNTH_BEAT_HEARTBEAT_FILE": str(heartbeat),
            "SYNTH_HEALTH_INTERVAL": str(INTERVAL),
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def _start_beat(tmp_path: Path, heartbeat: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SYNTH_BEAT_HEARTBEAT_FILE": str(heartbeat),
        "SYNTH_HEALTH_INTERVAL": str(INTERVAL),
    }
    with (tmp_path / "beat.log").open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "synth_workers",
                "beat",
                "-s",
                str(tmp_path / "schedule"),
                "-l",
                "INFO",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_beat_probe_fails_when_frozen_and_passes_after(tmp_path: Path) -> None:
    heartbeat = tmp_path / "beat.heartbeat"
    beat = _start_beat(tmp_path, heartbeat)
    try:
        assert wait_until(heartbeat.exists, timeout=60), (tmp_path / "beat.log").read_text()
        # live, and kept live: the loop turns every interval, though no entry is due for a
        # minute (a single write at start would go stale within these probes)
        first = heartbeat.stat().st_mtime
        started = time.monotonic()
        while time.monotonic() - started < 3 * INTERVAL:
            probe = _probe(heartbeat)
            assert probe.returncode == ExitCode.OK, probe.stderr
            assert probe.stdout.startswith("live: beat@")
        assert heartbeat.stat().st_mtime >= first + 2 * INTERVAL

        os.killpg(beat.pid, signal.SIGSTOP)  # frozen: the process is there, its loop is not
        frozen = time.monotonic()
        stale = 2 * INTERVAL  # the probe's default --max-age

        def verdict() -> bool:
            return read_heartbeat(heartbeat, stale).live

        # the probe's own check, read every 20 ms: it must turn within 2 intervals
        assert wait_until(lambda: not verdict(), timeout=30, interval=0.02)
        failed_after = time.monotonic() - frozen
        assert failed_after <= stale + 0.3, failed_after
        probe = _probe(heartbeat)  # and the command says so, with its exit code
        assert probe.returncode == ExitCode.FAILED, probe.stderr
        assert "not live: beat@" in probe.stderr and "last beat" in probe.stderr
        print(f"heartbeat stale {failed_after:.2f}s after SIGSTOP (interval {INTERVAL}s)")

        os.killpg(beat.pid, signal.SIGCONT)
        resumed = time.monotonic()
        assert wait_until(verdict, timeout=15, interval=0.02)
        live_after = time.monotonic() - resumed
        assert live_after <= INTERVAL + 0.5, live_after
        probe = _probe(heartbeat)
        assert probe.returncode == ExitCode.OK, probe.stderr
        print(f"heartbeat fresh again {live_after:.2f}s after SIGCONT")
        assert beat.poll() is None
    finally:
        _stop(beat)


def test_beat_probe_exit_codes_name_the_cause(tmp_path: Path) -> None:
    missing = _probe(tmp_path / "never-written")
    assert missing.returncode == ExitCode.FAILED
    assert "no heartbeat at" in missing.stderr and "never-written" in missing.stderr
    unset = subprocess.run(
        [sys.executable, "-m", "synth_workers.cli", "health", "beat"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "SYNTH_BEAT_HEARTBEAT_FILE"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unset.returncode == ExitCode.USAGE
    assert "SYNTH_BEAT_HEARTBEAT_FILE" in unset.stderr
    stale = tmp_path / "stale"
    stale.write_text('{"at": 1, "pid": 7, "name": "beat@old"}')
    old = _probe(stale)
    assert old.returncode == ExitCode.FAILED and "beat@old (pid 7) last beat" in old.stderr
    fresh = _probe(stale, "--max-age", str(time.time() + 3600))  # older than that: not stale
    assert fresh.returncode == ExitCode.OK, fresh.stderr
    broken = tmp_path / "broken"
    broken.write_text("{not json")
    assert _probe(broken).returncode == ExitCode.FAILED


def test_worker_probe_reads_the_worker_heartbeat(tmp_path: Path, start_worker: Any) -> None:
    """`synth-workers health worker` reads the file a worker's consumer timer rewrites."""
    heartbeat = tmp_path / "worker.heartbeat"
    env = {"SYNTH_HEARTBEAT_FILE": str(heartbeat), "SYNTH_HEALTH_INTERVAL": str(INTERVAL)}
    worker = start_worker("probe-test", pool="solo", env=env)
    assert wait_until(heartbeat.exists, timeout=30)

    def probe() -> Any:
        return subprocess.run(
            [sys.executable, "-m", "synth_workers.cli", "health", "worker"],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )

    live = probe()
    assert live.returncode == ExitCode.OK, live.stderr
    assert live.stdout.startswith(f"live: {worker.name}")
    os.killpg(worker.process.pid, signal.SIGSTOP)
    try:
        assert wait_until(lambda: not read_heartbeat(heartbeat, 2 * INTERVAL).live, timeout=10)
        stopped = probe()
        assert stopped.returncode == ExitCode.FAILED, stopped.stderr
        assert f"not live: {worker.name}" in stopped.stderr
    finally:
        os.killpg(worker.process.pid, signal.SIGCONT)
    assert wait_until(lambda: read_heartbeat(heartbeat, 2 * INTERVAL).live, timeout=10)
