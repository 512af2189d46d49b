"""Where a running ``synth-workers dev`` stack is, so that another shell can reach it.

``dev`` writes a small JSON file (``dev.json``: its pid, the Redis and Postgres URLs, the
ledger's schema, its folder and Flower's address) once its stack is ready, and removes it
when it stops. :func:`synth_workers.settings.load_settings` reads it when ``REDIS_URL`` or
``DATABASE_URL`` is unset, so ``enqueue``, every ``synth-workers`` command and
``celery -A synth_workers`` in another shell use that stack. A file whose ``dev`` process
is gone is ignored.

The file lives in ``$XDG_RUNTIME_DIR/synth-workers/``; without ``XDG_RUNTIME_DIR`` in
``<temp dir>/synth-workers-<uid>/`` (mode 0700, and ignored unless owned by this user), and
no warning is printed either way. This module reads no environment itself: the runtime
folder comes from the settings (``XDG_RUNTIME_DIR``).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "dev.json"


@dataclass(frozen=True)
class DevState:
    """What a running ``dev`` stack recorded about itself."""

    pid: int
    redis_url: str
    database_url: str
    db_schema: str
    base_dir: str
    flower_url: str | None = None


def state_dir(runtime_dir: str | Path | None) -> Path:
    """The folder of the state file: ``XDG_RUNTIME_DIR/synth-workers`` or the fallback."""
    if runtime_dir:
        return Path(runtime_dir) / "synth-workers"
    return Path(tempfile.gettempdir()) / f"synth-workers-{os.getuid()}"


def state_path(runtime_dir: str | Path | None) -> Path:
    """Where ``dev`` records its stack."""
    return state_dir(runtime_dir) / STATE_FILE


def _private_dir(path: Path) -> bool:
    """Whether ``path`` is a folder of this user that no one else may write."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.getuid()
        and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive, but not ours to trust
    return True


def write_state(runtime_dir: str | Path | None, state: DevState) -> Path:
    """Record ``state`` (atomically, mode 0600); return the file's path. ``OSError`` when
    the folder cannot be made private to this user."""
    folder = state_dir(runtime_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _private_dir(folder):
        raise PermissionError(f"{folder} is not a folder private to this user")
    path = folder / STATE_FILE
    fd, tmp = tempfile.mkstemp(prefix=".dev-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(state), out)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def read_state(runtime_dir: str | Path | None) -> DevState | None:
    """The running stack's record; ``None`` when there is none, its process is gone, or the
    file is unreadable or not this user's."""
    path = state_path(runtime_dir)
    if not _private_dir(path.parent):
        return None
    try:
        data = json.loads(path.read_text())
        state = DevState(
            pid=int(data["pid"]),
            redis_url=str(data["redis_url"]),
            database_url=str(data["database_url"]),
            db_schema=str(data["db_schema"]),
            base_dir=str(data["base_dir"]),
            flower_url=data.get("flower_url"),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state if _alive(state.pid) else None


def remove_state(runtime_dir: str | Path | None, pid: int) -> None:
    """Remove the record if it is ``pid``'s (a newer stack's record stays)."""
    path = state_path(runtime_dir)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if int(json.loads(path.read_text())["pid"]) == pid:
            path.unlink()
