"""A snapshot of the whole cluster: queues, workers, DLQ and ledger states.

Used by ``synth-workers status`` and the cluster gauges of ``synth-workers metrics serve``.
Sources: Redis for what waits in the transport (every priority sub-list of each queue), the
ledger for delayed jobs, the oldest waiting job, the DLQ and job states, and the heartbeat
each worker publishes in Redis (``synth:worker:<name>``, expiring after three intervals).
One snapshot costs one Redis pipeline, one key scan and four short ledger queries.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from synth_workers import routing
from synth_workers.ledger.transport import priority_lists

if TYPE_CHECKING:
    from synth_workers.app import SynthCelery

WORKER_KEY_PREFIX = "synth:worker:"


def worker_key(name: str) -> str:
    return f"{WORKER_KEY_PREFIX}{name}"


def workers(app: SynthCelery) -> list[dict[str, Any]]:
    """Live workers, from the heartbeats they publish in Redis."""
    client = app.redis
    keys = sorted(client.scan_iter(match=f"{WORKER_KEY_PREFIX}*", count=500))
    if not keys:
        return []
    found: list[dict[str, Any]] = []
    now = time.time()
    for raw in client.mget(keys):
        if raw is None:
            continue
        try:
            info = json.loads(raw)
        except ValueError:
            continue
        info["heartbeat_age_seconds"] = round(max(0.0, now - float(info.get("at", now))), 3)
        found.append(info)
    return found


def queue_depths(app: SynthCelery, queues: list[str]) -> dict[str, dict[int, int]]:
    """Messages waiting in Redis per queue and priority level (ours: 9 runs first)."""
    pipe = app.redis.pipeline(transaction=False)
    for queue in queues:
        for key in priority_lists(queue):
            pipe.llen(key)
    counts = iter(pipe.execute())
    depths: dict[str, dict[int, int]] = {}
    for queue in queues:
        depths[queue] = {}
        for step in range(routing.MIN_PRIORITY, routing.MAX_PRIORITY + 1):
            depths[queue][routing.from_transport(step)] = int(next(counts))
    return depths


def snapshot(app: SynthCelery, *, last_hour: bool = False) -> dict[str, Any]:
    """Everything ``status`` shows; ``last_hour`` adds jobs per state enqueued in the hour."""
    counts = app.ledger.counts(last_hour=last_hour)
    live = workers(app)
    names = list(routing.QUEUES)
    extra = set(counts.queues) | {q for w in live for q in w.get("queues", [])}
    names += sorted(extra - set(names))
    depths = queue_depths(app, names)
    queues = []
    for name in names:
        ledger_queue = counts.queues.get(name)
        depth = depths[name]
        queues.append(
            {
                "queue": name,
                "depth": depth,
                "waiting": sum(depth.values()),
                "delayed": ledger_queue.delayed if ledger_queue else 0,
                "oldest_age_seconds": ledger_queue.oldest_age_seconds if ledger_queue else None,
                "workers": sum(1 for w in live if name in w.get("queues", [])),
            }
        )
    result: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(),
        "queues": queues,
        "workers": live,
        "dlq_size": counts.dlq_size,
        "unfinished": counts.unfinished,
        "beat_last_slot": counts.beat_last_slot,
    }
    if last_hour:
        result["last_hour"] = counts.last_hour
    return result
