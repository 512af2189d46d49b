"""Celery's Redis pub/sub result consumer for the ledger backend
(:class:`~synth_workers.backend.LedgerBackend`): the waits noted are written to the ledger
before anything is read or drained, a ledger notice is replaced by the job's row, and a
group sent in bulk subscribes its members in one command.

A waiter is told of a job's end by a notice its completion publishes when the ledger says
someone waits. The mark sets the row's ``waited`` under the row's lock, so a completion
racing it sees the wait (``synth_workers.ledger.results.MARK``). Should a notice still be
missed (a row created, claimed and completed while the mark's own statement ran), the
waited jobs' rows are read again from the ledger whenever a drain hears nothing, at most
every :data:`RECHECK_SECONDS`: such a job's end reaches its waiter that much later instead
of never.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from celery import states
from celery.backends import redis as celery_redis

from synth_workers.ledger.results import read_results

# Celery's Redis result consumer, untyped in celery's stubs (partly missing there).
_RedisResultConsumer: Any = celery_redis.__dict__["ResultConsumer"]

#: Marks a notice published by :class:`~synth_workers.announce.ResultAnnouncer`: the state is
#: read from the ledger.
NOTICE = "synth_ledger"
#: Seconds between two reads of the waited jobs' rows while drains hear nothing.
RECHECK_SECONDS = 1.0


class ResultConsumer(_RedisResultConsumer):  # type: ignore[misc]
    """Celery's pub/sub result consumer; a ledger notice is replaced by the job's row."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: ids :meth:`consume_many` subscribed, each with its channel, until consumed
        self._just_subscribed: dict[str, Any] = {}
        #: States heard (notices and reads), and when the waited rows were last read.
        self._heard = 0
        self._read_at = time.monotonic()

    def on_wait_for_pending(self, result: Any, **kwargs: Any) -> None:
        """Before Celery reads what it waits on: the waits noted are in the ledger."""
        self.backend.flush_waits()
        self._read_at = time.monotonic()
        super().on_wait_for_pending(result, **kwargs)

    def drain_events(self, timeout: float | None = None) -> Any:
        self.backend.flush_waits()  # a drainer thread (then() under eventlet/gevent)
        heard = self._heard
        drained = super().drain_events(timeout)
        if self._heard == heard:
            self._recheck()
        return drained

    def _recheck(self) -> None:
        """The waited jobs that ended with no notice, from their rows (see the module's
        text); at most every :data:`RECHECK_SECONDS`."""
        now = time.monotonic()
        ledger = self.backend.ledger
        if ledger is None or now - self._read_at < RECHECK_SECONDS:
            return
        self._read_at = now
        ids = {job_id for waiting in self.backend._pending_results for job_id in list(waiting)}
        for row in read_results(ledger, ids).values():
            meta = self.backend.meta_from_decoded(self.backend._meta(row))
            if meta.get("status") in states.READY_STATES:
                self.on_state_change(meta, None)
                self._forget_buffered(meta)

    def _forget_buffered(self, meta: dict[str, Any]) -> None:
        """What Celery's ``on_wait_for_pending`` does after a read: a final state that the
        consumer also buffered (a notice came for a result already resolved) is dropped
        from the buffer, where nothing would take it."""
        if meta["status"] in (states.SUCCESS, states.FAILURE):
            pending = self.backend._pending_messages
            try:
                buffered = pending.pop(meta["task_id"])
            except KeyError:
                return
            pending.total -= len(buffered)

    def consume_many(self, task_ids: Sequence[str]) -> None:
        """``consume_from`` of every id in ``task_ids`` with one ``SUBSCRIBE`` (Celery's sends
        one per id): a group sent in bulk (``synth_workers.groups``) subscribes its members
        before their results' ``then()``, which then finds them subscribed."""
        if not task_ids:
            return
        with self._locked():
            if self._pubsub is None:
                self.start(task_ids[0])
            keys = []
            for task_id in task_ids:
                key = self._get_key_for_task(task_id)
                self._pending_unsubscribe.discard(key)
                self._just_subscribed[task_id] = key
                if key not in self.subscribed_to:
                    keys.append(key)
            if keys:
                self.subscribed_to.update(keys)
                with self.reconnect_on_error():
                    self._pubsub.subscribe(*keys)

    def consume_from(self, task_id: str) -> None:
        """Celery's, except for an id :meth:`consume_many` just subscribed (still subscribed:
        nothing to send), the first time it comes here."""
        key = self._just_subscribed.pop(task_id, None)
        if key is not None and self._pubsub is not None and key in self.subscribed_to:
            return
        super().consume_from(task_id)

    def on_state_change(self, meta: dict[str, Any], message: Any) -> None:
        self._heard += 1
        if meta.get(NOTICE):
            meta = self.backend.get_task_meta(meta["task_id"], cache=False)
        super().on_state_change(meta, message)
