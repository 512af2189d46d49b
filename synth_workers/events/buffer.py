"""Keeps event writes off a worker's hot path: the listener the app factory connects.

``started``, ``progress`` and ``succeeded`` (what every job emits, in the thread that runs
it), and the ``dead`` of a refused message, are appended to a per-process buffer; a
background thread writes what has gathered every ``linger`` seconds, many events per round
trip. Every other kind (``queued`` at enqueue, ``retrying``, ``dead``, ``cancelled``, ...)
is written at once, in the announcing thread,
together with whatever the buffer holds: one process's events reach Redis in the order it
announced them, and an enqueue returns only once its ``queued`` event is stored (so it
precedes anything a worker writes about the job).

The buffer is flushed when a worker process stops (the app factory connects :meth:`flush`
to Celery's shutdown signals) and at interpreter exit; a process killed outright loses at
most the last ``linger`` seconds of its buffered events. A forked child starts with an empty
buffer (its parent writes its own). If Redis cannot be reached the events are kept (up to
``max_pending``, oldest dropped first, with a warning) and retried.

When a write in the announcing thread times out (Redis frozen or cut off: the client's
``SYNTH_REDIS_TIMEOUT`` ran out), the listener raises
:class:`~synth_workers.lifecycle.ListenerTimeout` (an enqueue stops there rather than wait for
the same Redis again to publish) and, until a write succeeds, hands every event to the
background thread instead of waiting on Redis in the announcing thread again: events stay
in order, and no further job or enqueue pays the timeout for them (until then an enqueue may
return before its ``queued`` event is stored).
"""

from __future__ import annotations

import logging
import threading

import redis

from synth_workers.batchwriter import BatchWriter
from synth_workers.events.stream import EventWriter
from synth_workers.lifecycle import JobEvent, ListenerTimeout

log = logging.getLogger(__name__)

#: Kinds written from the background thread; all others are written at once.
BUFFERED_KINDS = frozenset({"started", "progress", "succeeded"})
#: Announcements that are not job events (``usage``: LLM token counts, for metrics only).
SKIPPED_KINDS = frozenset({"usage"})
BATCH = 500


class EventBuffer(BatchWriter[JobEvent]):
    """A lifecycle listener: buffers hot-path events, writes the rest at once, in order."""

    name = "synth-events-writer"
    batch = BATCH

    def __init__(
        self, writer: EventWriter, *, linger: float = 0.01, max_pending: int = 100_000
    ) -> None:
        self.writer = writer
        super().__init__(linger=linger, max_pending=max_pending)

    def _reset(self) -> None:
        super()._reset()
        #: The last write in an announcing thread timed out and none has succeeded since.
        self._timed_out = False

    @property
    def timed_out(self) -> bool:
        """A write in an announcing thread timed out: the background thread writes now."""
        return self._timed_out

    @timed_out.setter
    def timed_out(self, value: bool) -> None:
        self._timed_out = value

    def has_pending(self) -> bool:
        """Whether events wait to be written (a new one must go after them)."""
        return bool(self._pending)

    def __call__(self, event: JobEvent) -> None:
        if event.kind in SKIPPED_KINDS:
            return
        if (
            event.kind in BUFFERED_KINDS
            or self._timed_out
            # a refused message's ``dead`` comes in batches from the refusal writer's
            # thread, about a message no one enqueued through this process
            or event.data.get("failure_class") == "rejected_message"
        ):
            self.add(event)
            return
        self._pending.append(event)
        try:
            self.flush(raise_errors=True)
        except (redis.TimeoutError, TimeoutError) as exc:
            self._timed_out = True  # the background thread writes from now on
            self.wake()
            raise ListenerTimeout(f"events: Redis did not answer in time: {exc}") from exc
        except redis.ConnectionError:
            # Redis refused or dropped the connection: the events are kept and the thread
            # retries them; whoever needs Redis next (the publish) reports it, once.
            self._timed_out = True
            self.wake()

    def flush(self, raise_errors: bool = False) -> bool:
        """Write what is pending; asked by anyone but the hot path and this buffer's own
        thread (a process stopping, atexit, a test), the finished jobs' archive too."""
        done = super().flush(raise_errors)
        archive = self.writer.archive
        if (
            not raise_errors
            and threading.current_thread() is not self._thread
            and isinstance(archive, BatchWriter)
        ):
            done = archive.flush() and done
        return done

    def write_batch(self, batch: list[JobEvent]) -> None:
        self.writer.write(batch)

    def drained(self) -> None:
        self._timed_out = False
