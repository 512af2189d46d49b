"""Heartbeat files: a process's loop rewrites one on each turn, a probe reads its age.

A liveness probe that only asks whether the process exists misses a hang (a loop stuck on a
frozen connection, a stopped process). So the loop that does the work writes the file, and
the probe fails when the file is older than ``max_age``: the process has not come round its
loop since. Beat's scheduler loop writes ``SYNTH_BEAT_HEARTBEAT_FILE`` after every tick
(``synth_workers.ledger.scheduler``); a worker writes ``SYNTH_HEARTBEAT_FILE`` on its
consumer's timer (``synth_workers.health``). ``synth-workers health beat|worker`` reads them
(``synth_workers.healthcli``).

The file holds one JSON object, ``{"at": <unix time>, "pid": <int>, "name": <str>}``, and is
replaced atomically (written beside it, then renamed), so a reader never sees half of one.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


def write_heartbeat(path: Path, name: str) -> None:
    """Rewrite ``path`` with the time now (atomically); a failure is logged, not raised."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"at": time.time(), "pid": os.getpid(), "name": name}))
        tmp.replace(path)
    except OSError:
        log.exception("could not write the heartbeat file %s", path)


@dataclass(frozen=True)
class Verdict:
    """What a probe found: ``live`` and why (one line)."""

    live: bool
    reason: str
    age_seconds: float | None = None


def read_heartbeat(path: Path, max_age: float, now: float | None = None) -> Verdict:
    """Live when ``path`` was rewritten within ``max_age`` seconds of ``now``."""
    try:
        doc = json.loads(path.read_text())
        at = float(doc["at"])
    except FileNotFoundError:
        return Verdict(False, f"no heartbeat at {path}: the process has not written one yet")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Verdict(False, f"unreadable heartbeat at {path}: {type(exc).__name__}: {exc}")
    age = max(0.0, (time.time() if now is None else now) - at)
    who = f"{doc.get('name') or 'process'} (pid {doc.get('pid')})"
    if age > max_age:
        return Verdict(False, f"{who} last beat {age:.1f}s ago (more than {max_age:g}s)", age)
    return Verdict(True, f"{who} beat {age:.1f}s ago", age)


class LoopHeartbeat:
    """A loop's heartbeat: :meth:`beat` on each turn; the loop sleeps at most ``interval``
    between turns (see :meth:`cap`), so a probe may call it hung after ``2 * interval``."""

    def __init__(self, path: Path | None, interval: float, name: str) -> None:
        self.path = path
        self.interval = interval
        self.name = name
        self.beats = 0

    def beat(self) -> None:
        self.beats += 1
        if self.path is not None:
            write_heartbeat(self.path, self.name)

    def cap(self, sleep: float) -> float:
        """The loop's next sleep, shortened to the heartbeat interval."""
        return min(sleep, self.interval)
