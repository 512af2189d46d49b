"""Refused messages are dead-lettered in batches, off the worker's consuming loop.

The consumer (``synth_workers.consumer``) screens a message, acknowledges a refused one at
once (it is never put back on a queue) and hands it here; a thread writes what gathered every
``linger`` seconds in one multi-row statement. So a flood of bad messages costs the consuming
loop the screening alone, not a Postgres round trip each, and good jobs keep flowing.

While Postgres cannot be reached the refusals are kept (up to ``max_pending``, the oldest
dropped first, with an error logged) and retried. Like a message a worker has taken but not
started, a refusal still waiting here is lost if the worker is killed outright (at most the
last ``linger`` seconds' worth); a warm shutdown writes them (:meth:`RefusalWriter.flush`).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from synth_workers.errors import ServiceUnavailableError

if TYPE_CHECKING:
    from synth_workers.ledger.store import Ledger

log = logging.getLogger(__name__)
BATCH = 500


@dataclass(frozen=True)
class Refusal:
    """One refused message, as the ledger keeps it."""

    job_id: str | None
    task: str
    queue: str
    raw: str  # the message's first bytes, as text (``screening.stored_text``)
    reason: str
    detail: str


class RefusalWriter:
    """Writes refusals to the ledger from a background thread, many per statement."""

    def __init__(self, ledger: Ledger, *, linger: float = 0.01, max_pending: int = 100_000) -> None:
        self.ledger = ledger
        self.linger = linger
        self.max_pending = max_pending
        self.dropped = 0
        self._pending: collections.deque[Refusal] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def add(self, refusal: Refusal) -> None:
        self._idle.clear()
        self._pending.append(refusal)
        if self._thread is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._thread = threading.Thread(
                target=self._run, name="synth-refusal-writer", daemon=True
            )
            self._thread.start()
        self._wake.set()

    def flush(self, timeout: float = 10.0) -> bool:
        """Write everything pending now; False when Postgres could not take it."""
        done = self._write()
        self._idle.wait(timeout)
        return done

    def _run(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self.linger)  # let a batch gather
            self._wake.clear()
            if not self._write():
                time.sleep(0.5)  # Postgres unreachable: retry soon
                self._wake.set()

    def _write(self) -> bool:
        with self._lock:
            pending = self._pending
            while pending:
                batch = [pending.popleft() for _ in range(min(BATCH, len(pending)))]
                try:
                    self.ledger.record_rejected_many(batch)
                    _log_batch(batch)
                except ServiceUnavailableError:
                    pending.extendleft(reversed(batch))
                    overflow = len(pending) - self.max_pending
                    if overflow > 0:
                        for _ in range(overflow):
                            pending.popleft()
                        self.dropped += overflow
                        log.error("refused messages: ledger unreachable; dropped %d", overflow)
                    log.warning("refused messages: ledger unreachable; %d kept", len(pending))
                    return False
                except Exception:
                    log.exception("dead-lettering %d refused messages failed", len(batch))
                    self._one_by_one(batch)
            self._idle.set()
        return True

    def _one_by_one(self, batch: list[Refusal]) -> None:
        """After a batch failed for a reason of its own: write each alone, drop a bad one."""
        for refusal in batch:
            try:
                self.ledger.record_rejected_many([refusal])
                _log_batch([refusal])
            except Exception:
                self.dropped += 1
                log.exception("refused message %s could not be recorded; dropped", refusal)


def _log_batch(batch: list[Refusal]) -> None:
    """One line per batch (a flood of bad messages must not flood the logs), the messages'
    ids and details at DEBUG."""
    reasons = collections.Counter(r.reason for r in batch)
    log.warning(
        "dead-lettered %d refused message(s) (failure class rejected_message): %s",
        len(batch),
        ", ".join(f"{reason} {n}" for reason, n in reasons.most_common()),
    )
    if log.isEnabledFor(logging.DEBUG):
        for r in batch:
            log.debug(
                "refused %s (task %s, queue %s): %s: %s",
                r.job_id,
                r.task,
                r.queue,
                r.reason,
                r.detail,
            )
