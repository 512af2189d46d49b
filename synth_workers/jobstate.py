"""Job records in Redis: state, attempt, error and result of each job.

One hash per job, ``synth:job:<id>``, written at enqueue and on each transition; the
transitions that race (start vs cancel) are single Lua scripts, so a job is either cancelled
before it starts or runs, never both. The durable Postgres ledger replaces this store as the
source of truth; the states are already the ledger's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, cast

import redis

KEY_PREFIX = "synth:job:"
IDEMPOTENCY_PREFIX = "synth:idem:"
RESULT_LIMIT_BYTES = 64 * 1024


class JobState(StrEnum):
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    RETRYING = "failed-retrying"
    DEAD = "dead"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.DEAD, JobState.CANCELLED)


# KEYS[1] job hash; ARGV: attempt, now, ttl. Returns the state seen before, or "" if none.
_START = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'cancelled' or state == 'succeeded' or state == 'dead' then
  return state
end
redis.call('HSET', KEYS[1], 'state', 'running', 'attempt', ARGV[1], 'started_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return state or ''
"""

# KEYS[1] job hash; ARGV: now. Returns 1 when cancelled, 0 when too late.
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'queued' or state == 'scheduled' or state == 'failed-retrying' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1])
  return 1
end
if not state then return -1 end
return 0
"""


def job_key(job_id: str) -> str:
    return KEY_PREFIX + job_id


class JobStore:
    """Reads and writes job records on one Redis connection pool."""

    def __init__(self, client: redis.Redis, ttl: int) -> None:
        self.client = client
        self.ttl = ttl
        self._start = client.register_script(_START)
        self._cancel = client.register_script(_CANCEL)

    # --- producer side ----------------------------------------------------------------------
    def create(
        self,
        job_id: str,
        *,
        task: str,
        queue: str,
        priority: int,
        eta: float | None,
        idempotency_key: str | None,
    ) -> None:
        now = time.time()
        state = JobState.SCHEDULED if eta is not None and eta > now else JobState.QUEUED
        fields: dict[Any, Any] = {
            "task": task,
            "queue": queue,
            "priority": priority,
            "state": state.value,
            "attempt": 0,
            "enqueued_at": now,
        }
        if eta is not None:
            fields["eta"] = eta
        if idempotency_key is not None:
            fields["idempotency_key"] = idempotency_key
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(job_key(job_id), mapping=fields)
        pipe.expire(job_key(job_id), self.ttl)
        pipe.execute()

    def delete(self, job_id: str) -> None:
        self.client.delete(job_key(job_id))

    def claim_idempotency_key(self, key: str, job_id: str, window: int) -> str | None:
        """Bind ``key`` to ``job_id``; return the job id it was already bound to, if any."""
        full = IDEMPOTENCY_PREFIX + key
        if self.client.set(full, job_id, nx=True, ex=window):
            return None
        existing = self.client.get(full)
        return None if existing is None else _decode(existing)

    def release_idempotency_key(self, key: str, job_id: str) -> None:
        full = IDEMPOTENCY_PREFIX + key
        current = self.client.get(full)
        if current is not None and _decode(current) == job_id:
            self.client.delete(full)

    def cancel(self, job_id: str) -> int:
        """1 cancelled, 0 already running or finished, -1 unknown job."""
        return int(self._cancel(keys=[job_key(job_id)], args=[time.time()]))

    def get(self, job_id: str) -> dict[str, str] | None:
        raw = cast(Mapping[bytes, bytes], self.client.hgetall(job_key(job_id)))
        if not raw:
            return None
        return {k.decode(): v.decode() for k, v in raw.items()}

    # --- worker side --------------------------------------------------------------------------
    def start(self, job_id: str, attempt: int) -> str:
        """Mark running; return the state seen before ('' when the record is gone)."""
        return _decode(self._start(keys=[job_key(job_id)], args=[attempt, time.time(), self.ttl]))

    def succeed(self, job_id: str, result: Any) -> None:
        encoded = _encode_result(result)
        self._finish(job_id, JobState.SUCCEEDED, {"result": encoded})

    def retrying(self, job_id: str, error: BaseException, backoff: float) -> None:
        key = job_key(job_id)
        previous = self.client.hget(key, "backoffs")
        backoffs: list[float] = json.loads(previous) if previous else []
        backoffs.append(round(backoff, 4))
        self.client.hset(
            key,
            mapping={
                "state": JobState.RETRYING.value,
                "error_class": type(error).__name__,
                "error": str(error)[:2000],
                "next_attempt_at": time.time() + backoff,
                "backoffs": json.dumps(backoffs),
            },
        )

    def dead(self, job_id: str, error_class: str, error: str, traceback: str = "") -> None:
        self._finish(
            job_id,
            JobState.DEAD,
            {
                "error_class": error_class,
                "error": error[:2000],
                "traceback": traceback[-8000:],
            },
        )

    def _finish(self, job_id: str, state: JobState, extra: Mapping[str, str]) -> None:
        fields: dict[Any, Any] = {"state": state.value, "finished_at": time.time(), **extra}
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(job_key(job_id), mapping=fields)
        pipe.expire(job_key(job_id), self.ttl)
        pipe.execute()


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _encode_result(result: Any) -> str:
    try:
        encoded = json.dumps(result, default=str)
    except (TypeError, ValueError):
        encoded = json.dumps(repr(result))
    if len(encoded) > RESULT_LIMIT_BYTES:
        encoded = json.dumps({"truncated": True, "bytes": len(encoded)})
    return encoded
