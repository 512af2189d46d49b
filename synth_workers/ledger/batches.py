"""Every statement of the batch tier: items (deferred requests), batches, and the parked jobs.

A deferred job is *parked*: its ``synth_jobs`` row stays ``running`` (Celery reports it
STARTED, ``AsyncResult.get()`` waits as for any running job) with the lease owner
:data:`PARKED_OWNER` and a lease that never lapses (:data:`PARKED_UNTIL`), so no reaper
takes it back; its attempt is given back (a batch is not an attempt). A result written back
*resumes* it: ``queued`` again, unpublished, so the sweeper's outbox relay publishes its
stored message (chain, chord and links intact); its next run reads the result
(:mod:`synth_workers.batchtier.collector`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from psycopg import sql
from psycopg.types.json import Jsonb

from synth_workers.ledger.store import NOTIFY_CHANNEL
from synth_workers.states import JobState

if TYPE_CHECKING:
    import psycopg

    from synth_workers.ledger.store import Claim, Ledger

#: The lease owner of a parked job, and its lease: one that never lapses (a finite date, which
#: every reader of the row can load, unlike ``infinity``).
PARKED_OWNER = "batch-tier"
PARKED_UNTIL = datetime(9999, 1, 1, tzinfo=UTC)
_NOTIFY = sql.SQL("NOTIFY {}").format(sql.Identifier(NOTIFY_CHANNEL))


@dataclass(frozen=True)
class Item:
    """A deferred request: its job, where it goes, and (once known) what came back."""

    job_id: str
    provider: str
    model: str
    kind: str
    state: str
    custom_id: str | None
    request: dict[str, Any]
    result: Any
    created_age: float = 0.0


@dataclass(frozen=True)
class Batch:
    """A batch row the tier acts on."""

    id: str
    provider: str
    model: str
    kind: str
    state: str
    provider_batch_id: str | None
    created_at: float


_ITEM = sql.SQL(
    "SELECT job_id, provider, model, kind, state, custom_id, request, result "
    "FROM synth_batch_items WHERE job_id = %s"
)
_BATCH_COLUMNS = sql.SQL(
    "b.id, b.provider, b.model, b.kind, b.state, b.provider_batch_id, "
    "extract(epoch FROM b.created_at)"
)
_BATCH = sql.SQL("SELECT {} FROM synth_batches b WHERE b.id = %s").format(_BATCH_COLUMNS)
_TAKE_DUE = sql.SQL(
    "WITH due AS (SELECT id FROM synth_batches WHERE state = ANY(%s) AND "
    "next_check_at <= now() ORDER BY next_check_at LIMIT %s FOR UPDATE SKIP LOCKED) "
    "UPDATE synth_batches b SET next_check_at = now() + make_interval(secs => %s) "
    "FROM due WHERE b.id = due.id RETURNING {}"
).format(_BATCH_COLUMNS)


def _batch(row: Sequence[Any]) -> Batch:
    return Batch(str(row[0]), row[1], row[2], row[3], row[4], row[5], float(row[6]))


def item_of(ledger: Ledger, job_id: str) -> Item | None:
    with ledger.connection() as conn:
        row = conn.execute(_ITEM, (job_id,)).fetchone()
    return None if row is None else Item(str(row[0]), *row[1:])


def park(
    ledger: Ledger,
    claim: Claim,
    provider: str,
    model: str,
    kind: str,
    request: dict[str, Any],
    tokens: int,
) -> bool:
    """Record the request (once per job) and park the claimed job, in one transaction;
    False when the claim no longer holds (nothing written)."""
    try:
        with ledger.connection() as conn, conn.transaction():
            _park(ledger, conn, claim, provider, model, kind, request, tokens)
    except _NotHeldError:
        return False
    return True


class _NotHeldError(Exception):
    """The claim no longer holds: roll the parking back."""


def _park(
    ledger: Ledger,
    conn: psycopg.Connection[Any],
    claim: Claim,
    provider: str,
    model: str,
    kind: str,
    request: dict[str, Any],
    tokens: int,
) -> None:
    ledger.durable(conn)
    conn.execute(
        "INSERT INTO synth_batch_items (job_id, provider, model, kind, request, tokens) "
        "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (job_id) DO NOTHING",
        (claim.job_id, provider, model, kind, Jsonb(request), tokens),
    )
    parked = conn.execute(
        "UPDATE synth_jobs SET lease_owner = %s, lease_expires_at = %s, "
        "attempt = attempt - 1, updated_at = now() WHERE id = %s AND attempt = %s "
        "AND lease_owner = %s AND state = %s",
        (PARKED_OWNER, PARKED_UNTIL, claim.job_id, claim.attempt, claim.owner, JobState.RUNNING),
    ).rowcount
    if parked != 1:
        raise _NotHeldError


def forget(ledger: Ledger, job_id: str) -> None:
    """The job consumed its item's failure: its next attempt sends a new request."""
    with ledger.connection() as conn:
        conn.execute(
            "DELETE FROM synth_batch_items WHERE job_id = %s AND state = 'failed'", (job_id,)
        )


def resume(conn: psycopg.Connection[Any], job_ids: Sequence[str]) -> int:
    """Parked jobs back to their queue (published by the outbox relay), or ``cancelled``
    when someone cancelled them meanwhile; in the caller's transaction."""
    if not job_ids:
        return 0
    n = conn.execute(
        "UPDATE synth_jobs SET state = CASE WHEN cancel_requested THEN %s ELSE %s END, "
        "finished_at = CASE WHEN cancel_requested THEN now() END, lease_owner = NULL, "
        "lease_expires_at = NULL, published_at = NULL, updated_at = now() "
        "WHERE id = ANY(%s::uuid[]) AND state = %s AND lease_owner = %s",
        (JobState.CANCELLED, JobState.QUEUED, list(job_ids), JobState.RUNNING, PARKED_OWNER),
    ).rowcount
    conn.execute(_NOTIFY)
    return n


# --- collecting and submitting --------------------------------------------------------------
def waiting_groups(ledger: Ledger) -> list[tuple[str, str, str, int, float]]:
    """(provider, model, kind, requests waiting, age of the oldest in seconds)."""
    with ledger.connection() as conn:
        rows = conn.execute(
            "SELECT provider, model, kind, count(*), "
            "extract(epoch FROM now() - min(created_at)) FROM synth_batch_items "
            "WHERE state = 'pending' GROUP BY provider, model, kind"
        ).fetchall()
    return [(r[0], r[1], r[2], int(r[3]), float(r[4])) for r in rows]


def open_load(ledger: Ledger, provider: str, model: str) -> tuple[int, int]:
    """Requests and tokens in this (provider, model)'s open batches."""
    with ledger.connection() as conn:
        row = conn.execute(
            "SELECT coalesce(sum(items), 0), coalesce(sum(tokens), 0) FROM synth_batches "
            "WHERE provider = %s AND model = %s AND state IN ('submitting', 'submitted')",
            (provider, model),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def record_intent(
    ledger: Ledger,
    provider: str,
    model: str,
    kind: str,
    limit: int,
    max_tokens: int | None,
    lease: float,
    alone: bool = True,
) -> tuple[Batch, list[tuple[str, dict[str, Any]]]] | None:
    """The intent: a ``submitting`` batch owning up to ``limit`` waiting requests (oldest
    first, at most ``max_tokens`` estimated tokens; ``alone``: no other batch is open, so a
    first request over that goes anyway), each with its new custom id, committed before the
    provider is asked. None when nothing was left to take."""
    batch_id = str(uuid.uuid4())
    with ledger.connection() as conn, conn.transaction():
        ledger.durable(conn)
        rows = conn.execute(
            "SELECT job_id, tokens FROM synth_batch_items WHERE state = 'pending' AND "
            "provider = %s AND model = %s AND kind = %s ORDER BY created_at LIMIT %s "
            "FOR UPDATE SKIP LOCKED",
            (provider, model, kind, limit),
        ).fetchall()
        chosen: list[str] = []
        total = 0
        for job_id, tokens in rows:
            # over the token room: stop, unless it is the first and nothing else is open (a
            # request larger than the whole limit must not wait forever)
            if max_tokens is not None and total + tokens > max_tokens and (chosen or not alone):
                break
            chosen.append(str(job_id))
            total += int(tokens)
        if not chosen:
            return None
        conn.execute(
            "INSERT INTO synth_batches (id, provider, model, kind, items, tokens, next_check_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, now() + make_interval(secs => %s))",
            (batch_id, provider, model, kind, len(chosen), total, lease),
        )
        taken = conn.execute(
            "UPDATE synth_batch_items SET state = 'batched', batch_id = %s, "
            "generation = generation + 1, custom_id = replace(job_id::text, '-', '') || '-' "
            "|| (generation + 1) WHERE job_id = ANY(%s::uuid[]) RETURNING custom_id, request",
            (batch_id, chosen),
        ).fetchall()
        created = conn.execute(_BATCH, (batch_id,)).fetchone()
    assert created is not None
    return _batch(created), [(str(r[0]), r[1]) for r in taken]


def batch_items(ledger: Ledger, batch_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(custom id, request) of the items a batch still holds."""
    with ledger.connection() as conn:
        rows = conn.execute(
            "SELECT custom_id, request FROM synth_batch_items WHERE batch_id = %s "
            "AND state = 'batched' ORDER BY custom_id",
            (batch_id,),
        ).fetchall()
    return [(str(r[0]), r[1]) for r in rows]


def known_provider_ids(ledger: Ledger, provider: str) -> set[str]:
    with ledger.connection() as conn:
        rows = conn.execute(
            "SELECT provider_batch_id FROM synth_batches WHERE provider = %s "
            "AND provider_batch_id IS NOT NULL",
            (provider,),
        ).fetchall()
    return {str(r[0]) for r in rows}


def record_submitted(
    ledger: Ledger, batch_id: str, provider_batch_id: str, status: str, poll: float
) -> bool:
    """The provider's batch id, once: a batch already recorded keeps its first. Its first
    poll is due in ``poll`` seconds."""
    with ledger.connection() as conn:
        ledger.durable(conn)
        return (
            conn.execute(
                "UPDATE synth_batches SET state = 'submitted', provider_batch_id = %s, "
                "provider_status = %s, submitted_at = now(), next_check_at = now() + "
                "make_interval(secs => %s) WHERE id = %s AND state = 'submitting'",
                (provider_batch_id, status, poll, batch_id),
            ).rowcount
            == 1
        )


def take_due(ledger: Ledger, states: Sequence[str], hold: float, limit: int = 20) -> list[Batch]:
    """Batches in ``states`` whose lease lapsed (or whose next poll is due), taken for
    ``hold`` seconds by this process."""
    with ledger.connection() as conn:
        rows = conn.execute(_TAKE_DUE, (list(states), limit, hold)).fetchall()
    return [_batch(r) for r in rows]


def set_state(
    ledger: Ledger, batch_id: str, state: str, status: str | None, hold: float = 0.0
) -> None:
    with ledger.connection() as conn:
        conn.execute(
            "UPDATE synth_batches SET state = %s, provider_status = coalesce(%s, "
            "provider_status), next_check_at = now() + make_interval(secs => %s), "
            "ended_at = CASE WHEN %s = 'ended' THEN now() END WHERE id = %s",
            (state, status, hold, state, batch_id),
        )


# --- writing results back ----------------------------------------------------------------
def apply_outcomes(
    ledger: Ledger,
    batch_id: str,
    done: Sequence[tuple[str, Any]],
    failed: Sequence[tuple[str, Any]],
) -> int:
    """Write results (``done``) and per-request errors (``failed``), each (custom id, body),
    and resume their jobs, in one transaction. Guarded: only an item this batch still holds
    takes a result, so a batch applied again (its applier died) writes nothing twice.
    Returns the items written."""
    ids: list[str] = []
    with ledger.connection() as conn, conn.transaction():
        for state, outcomes in (("done", done), ("failed", failed)):
            if not outcomes:
                continue
            rows = conn.execute(
                "UPDATE synth_batch_items i SET state = %s, result = v.result, "
                "finished_at = now() FROM (SELECT unnest(%s::text[]) AS custom_id, "
                "unnest(%s::jsonb[]) AS result) v WHERE i.custom_id = v.custom_id "
                "AND i.batch_id = %s AND i.state = 'batched' RETURNING i.job_id",
                (state, [c for c, _ in outcomes], [Jsonb(b) for _, b in outcomes], batch_id),
            ).fetchall()
            ids.extend(str(r[0]) for r in rows)
        resume(conn, ids)
    return len(ids)


def give_back(ledger: Ledger, batch_id: str, deadline: float, window: float) -> tuple[int, int]:
    """Items the batch still holds once its results are applied (expired, cancelled, never
    answered): to the next batch while more than ``window`` of the job's ``deadline`` is
    left, else online (their jobs resumed). Returns (re-batched, sent online)."""
    with ledger.connection() as conn, conn.transaction():
        rows = conn.execute(
            "UPDATE synth_batch_items SET state = CASE WHEN created_at + make_interval("
            "secs => %s) > now() + make_interval(secs => %s) THEN 'pending' ELSE 'online' END,"
            " batch_id = NULL, returned = returned + 1 WHERE batch_id = %s AND "
            "state = 'batched' RETURNING job_id, state",
            (deadline, window, batch_id),
        ).fetchall()
        online = [str(r[0]) for r in rows if r[1] == "online"]
        resume(conn, online)
    return len(rows) - len(online), len(online)


def fail_all(ledger: Ledger, batch_id: str, status: int, message: str) -> int:
    """The provider refused the whole batch: each request fails as if alone."""
    with ledger.connection() as conn:
        customs = [
            str(r[0])
            for r in conn.execute(
                "SELECT custom_id FROM synth_batch_items WHERE batch_id = %s AND state = 'batched'",
                (batch_id,),
            ).fetchall()
        ]
    error = {"status": status, "message": message}
    return apply_outcomes(ledger, batch_id, [], [(c, error) for c in customs])
