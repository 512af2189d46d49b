"""`synth-workers dev` from another shell: a second process with no service variables finds
the running stack, runs the README's enqueue examples and the inspection commands; once
`dev` stops, the same commands say plainly that nothing runs."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .conftest import ROOT
from .test_stack import CLI, _clean_env, _read_until

README = ROOT / "README.md"


def readme_examples() -> list[str]:
    """The README's Python blocks that enqueue jobs: the enqueue guide's, the second email
    example and the embeddings one, as a user would paste them."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    wanted = [
        b
        for b in blocks
        # not the batch tier's sketch: its jobs wait for a provider's batch API
        if 'enqueue("tasks.' in b and "@app.task" not in b and "deferrable=True" not in b
    ]
    assert len(wanted) >= 3, wanted
    return wanted


def _run(args: list[str], env: dict[str, str], timeout: float = 60) -> Any:
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def test_another_shell_uses_the_running_dev_stack(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = _clean_env(
        XDG_RUNTIME_DIR=str(run),
        SYNTH_MAIL_OUTBOX=str(tmp_path / "outbox"),
        # embeddings through the OpenAI API at a closed loopback port: the job fails fast
        # (no model to load on a shared CI machine) and ends in the dead-letter queue
        SYNTH_EMBED_PROVIDER="openai",
        SYNTH_EMBED_BASE_URL="http://127.0.0.1:9/v1",
        OPENAI_API_KEY="not-used",
        SYNTH_RETRY_BACKOFF_BASE="0.2",
        SYNTH_RETRY_BACKOFF_CAP="0.5",
    )
    dev = subprocess.Popen(
        [*CLI, "dev", "--dir", str(tmp_path / "dev"), "--no-flower", "--no-beat"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    shell = _clean_env(XDG_RUNTIME_DIR=str(run))  # no REDIS_URL, no DATABASE_URL
    state = run / "synth-workers" / "dev.json"
    try:
        lines = _read_until(dev, "ready", timeout=120)
        assert any(line.startswith(f"shared    {state}") for line in lines), lines
        recorded = json.loads(state.read_text())
        assert recorded["pid"] == dev.pid
        assert (state.stat().st_mode & 0o777) == 0o600

        # the README's examples, pasted into a fresh interpreter
        script = "\n".join(readme_examples()) + "\nprint('job', h.id, h.state())\n"
        proc = _run([sys.executable, "-c", script], shell, timeout=90)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        first = re.search(r"^job (\S+) succeeded$", proc.stdout, re.M)
        assert first, proc.stdout + proc.stderr

        listed = _run([*CLI, "jobs", "list", "--json"], shell)
        assert listed.returncode == 0, listed.stderr
        rows = json.loads(listed.stdout)
        tasks = sorted(r["task"] for r in rows)
        assert tasks == sorted(
            ["tasks.email.send_email"] * 2
            + ["tasks.embeddings.index_documents", "tasks.embeddings.delete_documents"]
        ), tasks
        assert first.group(1) in {r["id"] for r in rows}

        status = _run([*CLI, "status", "--json"], shell)
        assert status.returncode == 0, status.stderr
        assert {q["queue"] for q in json.loads(status.stdout)["queues"]} >= {"email", "default"}

        # the embedding job fails (no embeddings server) and is dead-lettered: dlq list sees it
        deadline = time.monotonic() + 60
        dead: list[dict[str, Any]] = []
        while time.monotonic() < deadline and not dead:
            out = _run([*CLI, "dlq", "list", "--json"], shell)
            assert out.returncode == 0, out.stderr
            dead = json.loads(out.stdout)
            time.sleep(0.5)
        assert [r["task"] for r in dead] == ["tasks.embeddings.index_documents"]

        # celery -A synth_workers finds the stack's workers too
        ping = _run([sys.executable, "-m", "celery", "-A", "synth_workers", "inspect", "ping"],
                    shell)  # fmt: skip
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert "main@" in ping.stdout and "embeddings@" in ping.stdout

        # a second dev is refused while this one runs
        second = _run([*CLI, "dev", "--dir", str(tmp_path / "dev2")], shell)
        assert second.returncode == 2
        assert f"a dev stack is already running (pid {dev.pid}" in second.stderr

        dev.send_signal(signal.SIGINT)
        assert dev.wait(timeout=90) == 0
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
    assert not state.exists()
    # nothing runs now: every command says so, in one line, with one exit code
    commands = (["jobs", "list"], ["dlq", "list"], ["status"], ["enqueue", "tasks.system.ping"])
    for command in commands:
        out = _run([*CLI, *command], shell)
        assert out.returncode == 2, (command, out.stdout, out.stderr)
        assert out.stderr.startswith(
            "error: DATABASE_URL is not set and no `synth-workers dev` stack is running"
        ), (command, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_stale_record_is_ignored(tmp_path: Path) -> None:
    """A record whose `dev` process is gone (killed) does not point commands at nothing."""
    from synth_workers.devstate import DevState, read_state, write_state

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    url = "postgresql://x@/y?host=/nowhere"
    write_state(tmp_path, DevState(dead.pid, "redis://127.0.0.1:6390/0", url, "synth", "/x"))
    assert read_state(tmp_path) is None
    out = _run([*CLI, "jobs", "list"], _clean_env(XDG_RUNTIME_DIR=str(tmp_path)))
    assert out.returncode == 2
    assert "no `synth-workers dev` stack is running" in out.stderr
