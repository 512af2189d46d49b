"""Friction a new user met, each fixed: one-line errors when Redis or Postgres is down, one
exit code per cause, redaction that keeps names, the README's examples and tables, a clean
interpreter exit with Qdrant local mode, no XDG_RUNTIME_DIR warning."""

from __future__ import annotations

import inspect
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from synth_workers import ServiceUnavailableError, Settings, create_app, enqueue
from synth_workers.cli import main
from synth_workers.logging import Redactor

from .conftest import ROOT

CLI = [sys.executable, "-m", "synth_workers.cli"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if k not in env or env[k]}
    full.update({k: v for k, v in env.items() if v})
    for key in [k for k, v in env.items() if not v]:
        full.pop(key, None)
    return subprocess.run([*CLI, *args], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=60)  # fmt: skip


def test_enqueue_with_redis_down_prints_one_line() -> None:
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    proc = _cli("enqueue", "tasks.system.ping", REDIS_URL=url)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(f"error: Redis is not reachable at {url} (REDIS_URL): ")
    assert ".." not in proc.stderr


def test_enqueue_api_with_redis_down_logs_no_traceback(
    caplog: pytest.LogCaptureFixture, database_url: str
) -> None:
    """The lifecycle listener and the events writer keep the events (Redis is down); the
    publish reports it, once: no ERROR line, no traceback."""
    app = create_app(
        Settings(
            redis_url=f"redis://127.0.0.1:{_closed_port()}/0",
            database_url=database_url,
            db_schema="synth_test",
            redis_timeout=2,
        )
    )
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(ServiceUnavailableError):
            enqueue("tasks.system.ping", {}, app=app)
        noisy = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        assert noisy == [], [r.getMessage() for r in noisy]
    finally:
        app.close()


def test_enqueue_with_postgres_down_fails_fast_in_one_line() -> None:
    url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/x"
    started = time.monotonic()
    proc = _cli("enqueue", "tasks.system.ping", DATABASE_URL=url)
    took = time.monotonic() - started
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(f"error: Postgres is not reachable at {url} (DATABASE_URL): ")
    assert "pool initialization" not in proc.stderr and "error connecting" not in proc.stderr
    assert took < 8, took  # was 13 s: the pool's retries for 10 s (interpreter start included)


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "--json"],
        ["jobs", "list"],
        ["jobs", "cancel", "00000000-0000-0000-0000-000000000000"],
        ["dlq", "list"],
        ["dlq", "replay", "--all"],
        ["db", "migrate"],
        ["enqueue", "tasks.system.ping"],
    ],
)
def test_a_missing_database_url_is_exit_2_in_every_command(command: list[str]) -> None:
    proc = _cli(*command, DATABASE_URL="")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.startswith("error: DATABASE_URL is not set and no `synth-workers dev`")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_an_unreachable_postgres_is_exit_3_in_every_command() -> None:
    url = f"postgresql://postgres@127.0.0.1:{_closed_port()}/x"
    for command in (["status"], ["jobs", "list"], ["dlq", "list"], ["db", "migrate"]):
        proc = _cli(*command, DATABASE_URL=url)
        assert proc.returncode == 3, (command, proc.stderr)
        assert proc.stderr.startswith("error: Postgres is not reachable"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_redaction_keeps_a_missing_template_variables_name() -> None:
    from synth_workers.errors import PermanentError
    from tasks.email import render

    with pytest.raises(PermanentError) as caught:
        render("password_reset", {"name": "Ada"})
    message = str(caught.value)
    assert "reset_url" in message
    redactor = Redactor()
    assert redactor.scrub(message) == message  # a name, not a secret
    line = redactor(None, "error", {"event": "job failed", "error": message})
    assert "'reset_url' is undefined" in line["error"]
    # values still go, in reprs, JSON and key=value text
    scrubbed = redactor.scrub(
        "{'template': 'password_reset', 'password': 'hunter2'} "
        '{"api_key": "sk-abc"} token=tok_123'
    )
    assert "hunter2" not in scrubbed and "sk-abc" not in scrubbed and "tok_123" not in scrubbed
    assert "'template': 'password_reset'" in scrubbed


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_examples_define_what_they_use() -> None:
    """Every enqueue example compiles and uses no name it does not define or import (the
    second email example used an undefined `url`)."""
    import builtins
    import symtable

    readme = (ROOT / "README.md").read_text()
    for block in _python_blocks(readme):
        if 'enqueue("tasks.email.send_email"' not in block:
            continue
        table = symtable.symtable(block, "README", "exec")
        defined = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}
        used = {s.get_name() for s in table.get_symbols() if s.is_referenced()}
        missing = used - defined - set(dir(builtins))
        assert not missing, (missing, block)


def test_readme_states_enqueues_signature_and_every_command() -> None:
    from synth_workers.producer import enqueue as enqueue_fn

    readme = (ROOT / "README.md").read_text()
    written = re.search(r"`enqueue\((task_name.*?)\)` is the generic form", readme, re.S)
    assert written, "the README states enqueue's signature"
    stated = [p.strip().split("=")[0] for p in " ".join(written.group(1).split()).split(",")]
    params = list(inspect.signature(enqueue_fn).parameters.values())
    expected = [
        *(p.name for p in params if p.kind is not p.KEYWORD_ONLY),
        "*",
        *(p.name for p in params if p.kind is p.KEYWORD_ONLY),
    ]
    assert stated == expected, stated
    table = readme.split("## The `synth-workers` command", 1)[1].split("\n\n", 2)[1]
    for name in main.commands:
        assert f"`synth-workers {name}" in table, f"{name} missing from the command table"
    assert "2 bad usage or configuration (a" in readme and "missing `DATABASE_URL`" in readme


def test_qdrant_local_mode_exits_without_a_traceback(tmp_path: Path) -> None:
    code = (
        "from synth_workers import Settings\n"
        "from synth_workers.providers.vectors import vector_store\n"
        f"store = vector_store(Settings(qdrant_path={str(tmp_path / 'q')!r}))\n"
        "store.ensure_collection('documents', 4)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Exception ignored" not in proc.stderr and "__del__" not in proc.stderr, proc.stderr


def test_no_xdg_runtime_dir_warning(tmp_path: Path) -> None:
    # the tests' own processes (pgserver's platformdirs included)
    proc = subprocess.run([sys.executable, "-W", "error", "-c", "import pgserver"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    # and the dev stack's record without XDG_RUNTIME_DIR: a private fallback, no warning
    env: dict[str, Any] = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    env.update(TMPDIR=str(tmp_path), DATABASE_URL="")
    code = (
        "from synth_workers.devstate import state_path\n"
        "from synth_workers.settings import load_settings\n"
        "print(state_path(load_settings().runtime_dir))\n"
    )
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / f"synth-workers-{os.getuid()}" / "dev.json")
    assert proc.stderr == ""
