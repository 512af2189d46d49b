"""kombu's Redis transport, minus its ack emulation: the ledger already does that job.

Celery on Redis emulates acknowledgements: each delivered message is copied into an
``unacked`` hash (plus a sorted-set index) when a worker takes it, deleted again when the
worker acks, and pushed back to its queue by ``restore_visible`` once it has been out longer
than the visibility timeout. That costs two Redis round trips per job in the worker's main
process, and it is the source of Celery's known duplicates: a long or delayed job is handed
to a second worker after ``visibility_timeout`` whether or not the first is alive.

On this platform the ledger knows better (``synth_workers.ledger``): a job being run holds a
lease that its worker renews; the reaper requeues it when the lease expires, and the
reconciler re-publishes a job that is still *queued* in the ledger but no longer waiting in
Redis (a worker took the message and died before claiming it). So this transport keeps a
delivered message in worker memory only (enough for prefetch limits, for ``reject(requeue=
True)`` and for giving unstarted messages back at warm shutdown) and writes nothing to
Redis on delivery or ack. Selected by the app's ``broker_transport`` setting; the broker URL
stays ``redis://`` (or ``rediss://``, ``sentinel://`` URLs with the Sentinel transport
unchanged).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual


class QoS(kombu_redis.QoS):
    """Prefetch accounting in memory; no ``unacked`` hash, no visibility timeout."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: Any) -> None:
        virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        virtual.QoS.reject(self, delivery_tag, requeue=requeue)

    def restore_unacked(self, client: Any = None) -> Any:
        return virtual.QoS.restore_unacked(self)

    def restore_visible(self, *args: Any, **kwargs: Any) -> None:
        """Nothing to restore: the ledger's reaper and reconciler take jobs back."""


class Channel(kombu_redis.Channel):
    QoS = QoS

    def _restore(self, message: Any, leftmost: bool = False) -> None:
        """Put a delivered, unstarted message back on its queue (from memory)."""
        delivery = message.delivery_info
        with self.conn_or_acquire() as client, client.pipeline() as pipe:
            self._do_restore_message(  # type: ignore[attr-defined]
                message._raw, delivery["exchange"], delivery["routing_key"], pipe, leftmost
            )
            pipe.execute()


class Transport(kombu_redis.Transport):
    Channel = Channel
