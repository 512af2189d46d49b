"""What the handlers of one events server share: its :class:`State`, the handler base
class, ``/health``, and the ledger lookups (a job's owner and state)."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis.asyncio as aioredis

from synth_workers.events.cors import CorsHandler, CorsPolicy
from synth_workers.events.fanout import Fanout
from synth_workers.events.stream import HistoryReader
from synth_workers.ledger import Ledger

#: ``job id -> (owner user id, ledger state)``, ``None`` when the ledger has no such job.
JobLookup = Callable[[str], "tuple[str | None, str] | None"]


class State:
    """What every handler of one server shares."""

    def __init__(
        self,
        redis_client: aioredis.Redis,
        fanout: Fanout,
        secret: str,
        heartbeat: float,
        lookup: JobLookup,
        token_max_ttl: float,
        cors: CorsPolicy | None = None,
        history: HistoryReader | None = None,
    ) -> None:
        self.redis = redis_client
        self.fanout = fanout
        self.secret = secret
        #: The furthest ahead (seconds) a token's ``exp`` may lie.
        self.token_max_ttl = token_max_ttl
        self.heartbeat = heartbeat
        self.lookup = lookup
        #: A finished job's events once its stream went (none: Redis only).
        self.history: HistoryReader = history or (lambda job_id, cursor: [])
        self.cors = cors or CorsPolicy(())
        self.started = time.time()
        self.connections = 0
        self.events_sent = 0
        #: Set at shutdown: open streams end (their clients reconnect elsewhere, resuming).
        self.stopping = False


class Handler(CorsHandler):
    def initialize(self, state: State) -> None:
        self.state = state
        self.cors = state.cors
        self.set_default_headers()  # the constructor set them before ``cors`` was here


class HealthHandler(Handler):
    def get(self) -> None:
        state = self.state
        self.write(
            {
                "status": "ok",
                "connections": state.connections,
                "events_sent": state.events_sent,
                "uptime_seconds": round(time.time() - state.started, 3),
            }
        )


def ledger_lookup(ledger: Ledger) -> JobLookup:
    """Owner and state of a job, read from the ledger."""

    def lookup(job_id: str) -> tuple[str | None, str] | None:
        row = ledger.get(job_id)
        if row is None:
            return None
        return row["user_id"], str(row["state"])

    return lookup
