"""The batched mode's statements (``synth_workers.batched``): one claim for a whole batch
(riding with the completions of the process's previous jobs), one release of the claims a
batch did not run, and one hand-back of the jobs of a batch whose pool process died.

The claim's conditions are the single claim's (``fencing._CLAIM``: queued, not cancelled, not
expired); rows another transaction holds are skipped (``SKIP LOCKED``), not waited for, and
their jobs are claimed one by one when they run, like any job the batch did not claim.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from psycopg import sql

from synth_workers.ledger.fencing import _COMPLETE, _completion_params
from synth_workers.ledger.rows import Claim, text_array
from synth_workers.states import EventKind, FailureClass, JobState

if TYPE_CHECKING:
    from synth_workers.ledger.store import Ledger

_CLAIM_MANY = (
    sql.SQL(
        "WITH done AS ({complete}), picked AS (SELECT id FROM synth_jobs "
        "WHERE id = ANY(%(ids)s::uuid[]) AND state = %(queued)s AND NOT cancel_requested "
        "AND (expires_at IS NULL OR expires_at > now()) FOR UPDATE SKIP LOCKED), "
        "claimed AS (UPDATE synth_jobs j SET state = %(running)s, attempt = j.attempt + 1, "
        "lease_owner = %(owner)s, lease_expires_at = now() + make_interval(secs => %(lease)s), "
        "started_at = now(), updated_at = now() FROM picked WHERE j.id = picked.id "
        "RETURNING j.id, j.attempt, j.max_attempts, j.task, j.queue, j.user_id, "
        "extract(epoch FROM j.enqueued_at), j.correlation_id, j.waited OR (j.maybe_waited AND "
        "EXISTS (SELECT 1 FROM synth_waits w WHERE w.job_id = j.id))) "
        "SELECT c.*, (SELECT coalesce(array_agg(id), '{{}}') FROM done), "
        "(SELECT coalesce(array_agg(id) FILTER (WHERE waited), '{{}}') FROM done) "
        "FROM (SELECT 1) one LEFT JOIN claimed c ON true"
    )
    .format(complete=_COMPLETE)
    .as_bytes(None)
)

#: Claims a batch did not run (its messages went elsewhere: an eta timer, a refusal):
#: queued again with their attempt given back, fenced by the claim.
_RELEASE = sql.SQL(
    "UPDATE synth_jobs j SET state = %(queued)s, attempt = j.attempt - 1, lease_owner = NULL, "
    "lease_expires_at = NULL, published_at = now(), updated_at = now() FROM (SELECT "
    "unnest(%(ids)s::uuid[]) AS id, unnest(%(attempts)s::int[]) AS attempt) v "
    "WHERE j.id = v.id AND j.id = ANY(%(ids)s::uuid[]) AND j.attempt = v.attempt "
    "AND j.lease_owner = %(owner)s AND j.state = %(running)s"
).as_bytes(None)

#: A batch's pool process died: its jobs that process still held are queued again without
#: counting a worker loss (their messages are requeued marked to run alone).
#: Should the reaper have taken one back first (its lease lapsed before the main process
#: heard of the death: a busy machine), the worker loss it counted is taken back.
_LOST_BATCH = sql.SQL(
    "WITH held AS (UPDATE synth_jobs SET state = %(queued)s, failure_class = %(lost)s, "
    "error_class = 'WorkerLostError', last_error = %(error)s, published_at = now(), "
    "lease_owner = NULL, lease_expires_at = NULL, updated_at = now() "
    "WHERE id = ANY(%(ids)s::uuid[]) AND state = %(running)s "
    "AND starts_with(lease_owner, %(prefix)s) RETURNING id, task, queue, attempt), "
    "reaped AS (UPDATE synth_jobs SET worker_losses = worker_losses - 1, "
    "error_class = 'WorkerLostError', last_error = %(error)s, updated_at = now() "
    "WHERE id = ANY(%(ids)s::uuid[]) AND state = %(queued)s AND worker_losses > 0 "
    "AND error_class = 'LeaseExpired' "
    "AND starts_with(last_error, 'lease expired: worker ' || %(prefix)s) RETURNING id) "
    "SELECT * FROM held"
).as_bytes(None)


def job_ids(ids: Sequence[str]) -> list[str]:
    """The ids that can be ledger rows (UUIDs); any other id is left to the single claim."""
    valid = []
    for job_id in ids:
        try:
            uuid.UUID(job_id)
        except (TypeError, ValueError, AttributeError):
            continue
        valid.append(job_id)
    return valid


def claim_many(
    ledger: Ledger, ids: Sequence[str], owner: str, complete: Sequence[tuple[Claim, Any]] = ()
) -> list[Claim]:
    """Claim every queued job of ``ids`` for ``owner`` in one statement, completing
    ``complete`` (finished jobs of this process, fenced) in the same statement. The
    ``started`` events are the caller's to announce, when each job starts."""
    params = {
        **_completion_params(complete),
        # named here too: the completion statement may take them as literals or parameters
        "running": JobState.RUNNING,
        "succeeded": JobState.SUCCEEDED,
        "ids": text_array(job_ids(ids)),
        "queued": JobState.QUEUED,
        "owner": owner,
        "lease": ledger.settings.lease_seconds,
    }
    with ledger.held() as conn:
        rows = conn.execute(_CLAIM_MANY, params).fetchall()
    if rows:
        done, waited = rows[0][9], rows[0][10]
        ledger._late_unless({str(i) for i in done}, complete, {str(i) for i in waited})
    return [
        Claim(str(r[0]), int(r[1]), r[2], owner, r[3], r[4], r[5], r[7], float(r[6]), bool(r[8]))
        for r in rows
        if r[0] is not None
    ]


def release(ledger: Ledger, claims: Sequence[Claim]) -> None:
    """Queue again the jobs of ``claims`` (one owner's) that were claimed but not run."""
    if not claims:
        return
    with ledger.connection() as conn:
        conn.execute(
            _RELEASE,
            {
                "queued": JobState.QUEUED,
                "running": JobState.RUNNING,
                "owner": claims[0].owner,
                "ids": text_array(c.job_id for c in claims),
                "attempts": text_array(str(int(c.attempt)) for c in claims),
            },
        )


def lost_batch(ledger: Ledger, ids: Sequence[str], owner_prefix: str) -> list[str]:
    """The pool process (lease owners ``owner_prefix``) died running a batch: its jobs of
    ``ids`` it still held are queued again, no worker loss counted. Returns their ids."""
    with ledger.connection() as conn:
        rows = conn.execute(
            _LOST_BATCH,
            {
                "queued": JobState.QUEUED,
                "running": JobState.RUNNING,
                "lost": FailureClass.WORKER_LOST,
                "error": "its pool process died during a batch; it runs alone next",
                "ids": job_ids(ids),
                "prefix": owner_prefix,
            },
        ).fetchall()
    for row in rows:
        ledger._announce_row(EventKind.QUEUED, str(row[0]), row, reason="batch_lost")
    return [str(r[0]) for r in rows]
