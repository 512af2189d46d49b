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
UNFINISHED = ("scheduled", "queued", "running", "failed-retrying")
STATES = (*UNFINISHED, "succeeded", "dead", "cancelled")


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
    ledger = app.ledger
    with ledger.connection() as conn:
        per_queue = conn.execute(
            "SELECT queue, count(*) FILTER (WHERE state IN ('scheduled', 'failed-retrying')), "
            "extract(epoch FROM max(now() - coalesce(run_at, enqueued_at)) "
            "FILTER (WHERE state = 'queued')) FROM synth_jobs "
            "WHERE state IN ('scheduled', 'failed-retrying', 'queued') GROUP BY queue"
        ).fetchall()
        unfinished = dict.fromkeys(UNFINISHED, 0)
        for state, count in conn.execute(
            "SELECT state, count(*) FROM synth_jobs WHERE state = ANY(%s) GROUP BY state",
            (list(UNFINISHED),),
        ).fetchall():
            unfinished[state] = int(count)
        dlq_row = conn.execute("SELECT count(*) FROM synth_jobs WHERE state = 'dead'").fetchone()
        beat_row = conn.execute(
            "SELECT extract(epoch FROM max(created_at)) FROM synth_periodic_slots"
        ).fetchone()
        hour: dict[str, int] = {}
        if last_hour:
            hour = dict.fromkeys(STATES, 0)
            for state, count in conn.execute(
                "SELECT state, count(*) FROM synth_jobs WHERE enqueued_at >= now() - "
                "interval '1 hour' GROUP BY state"
            ).fetchall():
                hour[state] = int(count)
    live = workers(app)
    ledger_queues = {row[0]: row for row in per_queue}
    names = list(routing.QUEUES)
    extra = set(ledger_queues) | {q for w in live for q in w.get("queues", [])}
    names += sorted(extra - set(names))
    depths = queue_depths(app, names)
    queues = []
    for name in names:
        row = ledger_queues.get(name)
        depth = depths[name]
        queues.append(
            {
                "queue": name,
                "depth": depth,
                "waiting": sum(depth.values()),
                "delayed": int(row[1]) if row else 0,
                "oldest_age_seconds": round(float(row[2]), 3) if row and row[2] else None,
                "workers": sum(1 for w in live if name in w.get("queues", [])),
            }
        )
    result: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(),
        "queues": queues,
        "workers": live,
        "dlq_size": int(dlq_row[0]) if dlq_row else 0,
        "unfinished": unfinished,
        "beat_last_slot": float(beat_row[0]) if beat_row and beat_row[0] else None,
    }
    if last_hour:
        result["last_hour"] = hour
    return result
