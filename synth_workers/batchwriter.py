"""A background writer: items gathered in memory and written many per round trip by a thread.

The event buffer (events to Redis Streams, ``synth_workers.events.buffer``) and the refusal
writer (refused messages to the ledger, ``synth_workers.ledger.refusals``) are both one.
:meth:`BatchWriter.add` appends an item and wakes the thread, which lets a batch gather for
``linger`` seconds and hands up to ``batch`` items at a time to :meth:`BatchWriter.write_batch`.
A batch the store cannot take now (:meth:`BatchWriter.kept` says so of its error) is put back,
in order, and retried every ``retry_after`` seconds; past ``max_pending`` items the oldest are
dropped (counted in ``dropped``, logged). Any other error goes to :meth:`BatchWriter.failed`.
A forked child starts empty and starts its own thread on its first item.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class BatchWriter(Generic[T]):
    """Subclasses implement :meth:`write_batch` (and may refine the other hooks)."""

    #: The thread's name, and the prefix of this writer's log lines.
    name = "synth-batch-writer"
    #: The most items handed to one :meth:`write_batch` call.
    batch = 500
    #: Seconds between retries while the store cannot take a batch.
    retry_after = 0.5

    def __init__(self, *, linger: float = 0.01, max_pending: int = 100_000) -> None:
        self.linger = linger
        self.max_pending = max_pending
        self.dropped = 0
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._pending: collections.deque[T] = collections.deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False  # the last write failed and was kept (logged once)

    # --- hooks ------------------------------------------------------------------------------
    def write_batch(self, batch: list[T]) -> None:
        raise NotImplementedError

    def kept(self, exc: Exception) -> bool:
        """Whether a batch that failed with ``exc`` is kept and retried (default: always)."""
        return True

    def failed(self, batch: list[T], exc: Exception) -> None:
        """A batch that failed for a reason of its own (:meth:`kept` said no)."""
        self.dropped += len(batch)
        log.error("%s: %d item(s) dropped: %r", self.name, len(batch), exc)

    def drained(self) -> None:
        """Called (under the lock) once everything pending was written."""

    # --- use --------------------------------------------------------------------------------
    def add(self, item: T) -> None:
        """Queue ``item`` for the thread's next batch."""
        self._pending.append(item)
        if self._thread is None:
            self._start()
        if not self._wake.is_set():
            self._wake.set()

    def wake(self) -> None:
        """Have the thread write what is pending (starting it if needed)."""
        self._start()
        self._wake.set()

    def flush(self, raise_errors: bool = False) -> bool:
        """Write every pending item now, in order; False when the store could not take them
        (kept for the thread to retry), or the error itself with ``raise_errors``."""
        with self._lock:
            pending = self._pending
            while pending:
                batch = [pending.popleft() for _ in range(min(self.batch, len(pending)))]
                try:
                    self.write_batch(batch)
                except Exception as exc:
                    if not self.kept(exc):
                        self.failed(batch, exc)
                        continue
                    pending.extendleft(reversed(batch))
                    self._drop_overflow()
                    if raise_errors:
                        raise
                    # once per outage: the thread retries every retry_after seconds
                    log.log(
                        logging.DEBUG if self._failing else logging.WARNING,
                        "%s: writing failed (%s); %d item(s) kept, retrying",
                        self.name,
                        exc,
                        len(pending),
                    )
                    self._failing = True
                    return False
            if self._failing:
                self._failing = False
                log.warning("%s: writing again", self.name)
            self.drained()
        return True

    def _drop_overflow(self) -> None:
        overflow = len(self._pending) - self.max_pending
        if overflow > 0:
            for _ in range(overflow):
                self._pending.popleft()
            self.dropped += overflow
            log.error("%s: store unreachable; dropped the %d oldest item(s)", self.name, overflow)

    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            time.sleep(self.linger)  # let a batch gather
            self._wake.clear()
            if not self.flush():
                time.sleep(self.retry_after)  # the store is unreachable: retry soon
                self._wake.set()
