"""How a long-lived Redis connection notices a dead link (packets dropped, nothing refused).

A cut cable, a partition or a firewall that drops packets leaves a TCP connection half-open:
nothing errors, a blocking read just never returns. Every Redis client of the platform
(Celery's broker transport, the platform's own client, the event-stream clients) therefore
gets, besides its socket timeout (``SYNTH_REDIS_TIMEOUT``) for commands:

- TCP keepalives probing an idle connection after :data:`KEEPALIVE_IDLE` seconds;
- ``health_check_interval`` = :data:`HEALTH_CHECK_SECONDS`: redis-py pings a connection
  idle that long before using it, and kombu checks its BRPOP and pub/sub connections that
  often, dropping one whose reply is overdue (kombu's BRPOP waits 1 s on the server).

One more thing would hide a dead link: Celery sends its worker heartbeat (every 2 s, on the
consumer's event loop) with unlimited retries, so against a frozen Redis the loop sits in
kombu's reconnect loop until Redis answers again and none of the checks above runs.
:class:`BoundedHeartbeat` re-schedules it without retries: a heartbeat that cannot be
published fails within the socket timeout, Celery's consumer reports the lost connection
("Connection to broker lost") and reconnects.

So a worker whose Redis traffic is frozen notices within about ``SYNTH_REDIS_TIMEOUT`` plus
a heartbeat (or ``1 + 2 x HEALTH_CHECK_SECONDS`` when idle otherwise), inside
``SYNTH_REDIS_TIMEOUT + 30`` s, and reconnects once the link is back. The ledger's
connections have their own (``SYNTH_DB_TCP_TIMEOUT``: ``ledger/pool.py``).
"""

from __future__ import annotations

import socket
from typing import Any

from celery import bootsteps

#: Seconds between the health checks of a long-lived Redis connection.
HEALTH_CHECK_SECONDS = 5
#: TCP keepalive: first probe after this many idle seconds, then every
#: :data:`KEEPALIVE_INTERVAL`, giving up after :data:`KEEPALIVE_COUNT` unanswered.
KEEPALIVE_IDLE = 10
KEEPALIVE_INTERVAL = 5
KEEPALIVE_COUNT = 3


def keepalive_options() -> dict[int, int]:
    """redis-py's ``socket_keepalive_options`` (Linux names; others get the OS defaults)."""
    names = (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
        ("TCP_KEEPCNT", KEEPALIVE_COUNT),
    )
    return {getattr(socket, name): value for name, value in names if hasattr(socket, name)}


def redis_kwargs() -> dict[str, Any]:
    """Keyword arguments for a redis-py client (and kombu's transport options)."""
    return {
        "socket_keepalive": True,
        "socket_keepalive_options": keepalive_options(),
        "health_check_interval": HEALTH_CHECK_SECONDS,
    }


class BoundedHeartbeat(bootsteps.StartStopStep):
    """Consumer bootstep: Celery's worker heartbeat re-scheduled without retries (above)."""

    label = "synth-bounded-heartbeat"
    requires = ("celery.worker.consumer.heart:Heart",)

    def start(self, c: Any) -> None:
        heart = getattr(c, "heart", None)
        if heart is None or getattr(heart, "tref", None) is None:
            return
        heart.timer.cancel(heart.tref)
        heart.tref = heart.timer.call_repeatedly(
            heart.interval, heart._send, ("worker-heartbeat", False)
        )
