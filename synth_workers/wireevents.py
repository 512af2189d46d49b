"""A job's lifecycle events in the same Redis write as its message
(:func:`synth_workers.wire.publish`): the events writer's script call is staged among the
write's commands instead of sent on its own (:func:`tell`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from synth_workers.events.buffer import EventBuffer
from synth_workers.lifecycle import JobEvent, Lifecycle, ListenerTimeout

log = logging.getLogger(__name__)

#: Per events writer: a copy whose script call is recorded instead of sent.
_loaded: dict[int, Any] = {}  # writers whose script this process loaded into Redis


def stage(listener: Any, events: Sequence[JobEvent], commands: list[Any]) -> int | None:
    """Put ``listener``'s Redis write of ``events`` into ``commands`` when it is the events
    buffer (``synth_workers.events.buffer``) with nothing pending before them: returns the
    command's index there; ``None``: call the listener as usual.

    The write is the writer's own script call (``EventWriter.command``), sent as
    ``EVALSHA`` (a redis-py ``Script`` would ask ``SCRIPT EXISTS`` first, a second round
    trip). When Redis does not know the script (it restarted), the events are
    written through the listener after the write."""
    if not isinstance(listener, EventBuffer) or listener.has_pending() or listener.timed_out:
        return None  # not the buffer, events before these wait, or its thread writes now
    writer = listener.writer
    if _loaded.get(id(writer)) is not writer:
        writer.load_script()  # once per process and writer
        _loaded[id(writer)] = writer
    keys, args = writer.command(list(events))
    commands.append(("EVALSHA", writer.script_sha, len(keys), *keys, *args))
    return len(commands) - 1


def unstage(listener: Any, events: Sequence[JobEvent]) -> None:
    """The write failed: the buffer keeps the events and writes them from its thread
    (as it does when its own write fails), ahead of whatever it is told next."""
    listener.timed_out = True
    for event in events:
        listener.add(event)
    listener.wake()


def tell(
    lifecycle: Lifecycle, events: Sequence[JobEvent], commands: list[Any]
) -> list[tuple[Any, int]]:
    """Tell every listener of ``events`` (in connection order), as ``Lifecycle.emit`` with
    ``raise_timeouts`` does, except that the events writer's write goes into ``commands``.
    Returns the listeners staged there, with their command's index."""
    staged: list[tuple[Any, int]] = []
    timed_out: ListenerTimeout | None = None
    for listener in lifecycle.listeners if events else ():
        try:
            index = stage(listener, events, commands)
            if index is not None:
                staged.append((listener, index))
                continue
            for event in events:
                listener(event)
        except ListenerTimeout as exc:
            timed_out = timed_out or exc
        except Exception:
            log.exception("lifecycle listener %r failed on %s", listener, events[0].kind)
    if timed_out is not None:
        raise timed_out
    return staged


def forget(writer: Any) -> None:
    """Redis answered that it does not know ``writer``'s script (it restarted): load it
    again before the next staging."""
    _loaded.pop(id(writer), None)
