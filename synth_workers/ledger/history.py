"""Finished jobs' event history in the ledger (``synth_job_history``): the durable copy that
lets a job's Redis stream go soon after the job ends (see ``synth_workers.events.history``).

One row per job (migration 0012): its events as a JSON array of ``[ms, seq, fields]``, where
``ms-seq`` is the event's Redis stream id, so a reader's cursor (``since=`` /
``Last-Event-ID``) means the same here and in Redis. A job costs the ledger one tuple and one
index entry, however many events it has. Archiving a job again (replayed after it ended)
appends only the events after the last one stored: writing the same event twice is a no-op.
The retention pass (``Queries.apply_retention``) deletes the rows of jobs the ledger no
longer holds.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from synth_workers.ledger.rows import text_array

if TYPE_CHECKING:
    from synth_workers.ledger.pool import LedgerPool

#: ``(ms, seq, fields)``: one event as stored.
StoredEvent = tuple[int, int, Mapping[str, str]]
#: ``(job id, its events in stream order)``: one job as stored; ids unique per call.
HistoryRow = tuple[str, Sequence[StoredEvent]]

#: The arrays go as text literals (:func:`text_array`): psycopg's own dumping of a list is
#: Python, element by element. On a conflict (the job archived before) only the events after
#: the stored last id are appended.
_UPSERT = """
INSERT INTO synth_job_history AS h (job_id, last_ms, last_seq, events)
SELECT * FROM unnest(%s::uuid[], %s::bigint[], %s::bigint[], %s::jsonb[])
ON CONFLICT (job_id) DO UPDATE SET
    events = h.events || coalesce((
        SELECT jsonb_agg(e ORDER BY (e ->> 0)::bigint, (e ->> 1)::bigint)
        FROM jsonb_array_elements(EXCLUDED.events) AS e
        WHERE ((e ->> 0)::bigint, (e ->> 1)::bigint) > (h.last_ms, h.last_seq)
    ), '[]'::jsonb),
    last_ms = CASE WHEN (EXCLUDED.last_ms, EXCLUDED.last_seq) > (h.last_ms, h.last_seq)
                   THEN EXCLUDED.last_ms ELSE h.last_ms END,
    last_seq = CASE WHEN (EXCLUDED.last_ms, EXCLUDED.last_seq) > (h.last_ms, h.last_seq)
                    THEN EXCLUDED.last_seq ELSE h.last_seq END
"""
_READ = "SELECT events FROM synth_job_history WHERE job_id = %s"


def store_events(ledger: LedgerPool, rows: Sequence[HistoryRow]) -> None:
    """Write ``rows`` (jobs with at least one event each, no job twice) in one statement,
    committed durably (the caller lets the Redis copy go once this returns)."""
    if not rows:
        return
    jobs = [job for job, _ in rows]
    last_ms = [str(events[-1][0]) for _, events in rows]
    last_seq = [str(events[-1][1]) for _, events in rows]
    dumps = json.JSONEncoder(separators=(",", ":")).encode
    arrays = [dumps([[ms, seq, fields] for ms, seq, fields in events]) for _, events in rows]
    with ledger.connection() as conn, conn.transaction():
        ledger.durable(conn)
        conn.execute(_UPSERT, tuple(map(text_array, (jobs, last_ms, last_seq, arrays))))


def events_after(
    ledger: LedgerPool, job_id: str, after: tuple[int, int], limit: int = 10_000
) -> list[tuple[int, int, dict[str, Any]]]:
    """The stored events of ``job_id`` whose id is above ``after``, in order."""
    with ledger.connection() as conn:
        found = conn.execute(_READ, (job_id,)).fetchone()
    if found is None:
        return []
    events = ((int(ms), int(seq), dict(fields)) for ms, seq, fields in found[0])
    return [e for e in events if (e[0], e[1]) > after][:limit]
