"""Celery's Redis pub/sub result consumer for the ledger backend
(:class:`~synth_workers.backend.LedgerBackend`): the waits noted are written to the ledger
before anything is read or drained, a ledger notice is replaced by the job's row, and a
group sent in bulk subscribes its members in one command."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery.backends import redis as celery_redis

# Celery's Redis result consumer, untyped in celery's stubs (partly missing there).
_RedisResultConsumer: Any = celery_redis.__dict__["ResultConsumer"]

#: Marks a notice published by :class:`~synth_workers.announce.ResultAnnouncer`: the state is
#: read from the ledger.
NOTICE = "synth_ledger"


class ResultConsumer(_RedisResultConsumer):  # type: ignore[misc]
    """Celery's pub/sub result consumer; a ledger notice is replaced by the job's row."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: ids :meth:`consume_many` subscribed, each with its channel, until consumed
        self._just_subscribed: dict[str, Any] = {}

    def on_wait_for_pending(self, result: Any, **kwargs: Any) -> None:
        """Before Celery reads what it waits on: the waits noted are in the ledger."""
        self.backend.flush_waits()
        super().on_wait_for_pending(result, **kwargs)

    def drain_events(self, timeout: float | None = None) -> Any:
        self.backend.flush_waits()  # a drainer thread (then() under eventlet/gevent)
        return super().drain_events(timeout)

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
        if meta.get(NOTICE):
            meta = self.backend.get_task_meta(meta["task_id"], cache=False)
        super().on_state_change(meta, message)
