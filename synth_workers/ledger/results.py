"""The ledger's answers to Celery's result API, and chord counting (``synth_workers.backend``).

- :func:`read_results`: the result-bearing columns of some jobs, in one statement.
- :func:`set_chord_size` / :func:`add_to_chord`: a chord's size, set by the producer.
- :func:`record_chord_part`: a header part finished; counted once per (chord, part job) in
  one transaction that, for the part that completes the chord, also marks it ``fired`` and
  lets the caller write the callback's job row in that same transaction (the outbox), so the
  callback is enqueued exactly once however often parts run again.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from psycopg.errors import DeadlockDetected
from psycopg.rows import dict_row

from synth_workers.ledger.store import encode_result

if TYPE_CHECKING:
    import psycopg

    from synth_workers.ledger.store import Ledger

#: The columns a result read needs (``SELECT *`` would carry payloads for nothing).
_RESULT_COLUMNS = (
    "SELECT id::text AS id, task, queue, state, attempt, payload, args, result, "
    "error_class, error_module, error_args, last_error, traceback, lease_owner, "
    "finished_at, (message->'headers'->>'ignore_result')::boolean AS ignore_result "
    "FROM synth_jobs WHERE id = ANY(%s::uuid[])"
)


def _uuids(ids: Iterable[str]) -> list[str]:
    """The ids that can be ledger job ids (UUIDs); others have no row by construction."""
    valid: list[str] = []
    for job_id in ids:
        try:
            valid.append(str(uuid.UUID(str(job_id))))
        except ValueError:
            continue
    return valid


def read_results(ledger: Ledger, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The rows of the jobs among ``ids`` the ledger holds, by id (missing ids: absent)."""
    wanted = _uuids(ids)
    if not wanted:
        return {}
    with ledger.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(_RESULT_COLUMNS, (wanted,)).fetchall()
    return {str(row["id"]): row for row in rows}


#: The mark of :func:`mark_waited`. The rows it sets stay locked until it commits, and a
#: completion that waited for that lock reads their newest version: it sees ``waited``
#: (migration 0014), where its look-up of ``synth_waits`` has its own, older snapshot.
MARK = (
    "WITH w AS (INSERT INTO synth_waits (job_id) SELECT unnest(%(ids)s::uuid[]) "
    "ON CONFLICT (job_id) DO NOTHING) UPDATE synth_jobs SET maybe_waited = true, waited = true "
    "WHERE id = ANY(%(ids)s::uuid[]) AND NOT waited"
)
#: Tries of :func:`mark_waited` when Postgres ends it as a deadlock.
MARK_TRIES = 5


def mark_waited(ledger: Ledger, ids: Iterable[str]) -> None:
    """Someone is about to wait on these jobs' results: their success will be announced on
    Celery's result channel (``synth_workers.backend``). Noted in ``synth_waits`` (a job
    whose row does not exist yet: a chain step, a chord callback) and, in the same
    statement, on the rows that exist (``maybe_waited`` and ``waited``: migrations 0013 and
    0014). Setting them locks those rows, in id order; a worker's completion of several of
    them may hold one and wait for another, and Postgres then ends one statement as a
    deadlock: the mark tries again."""
    wanted = sorted(_uuids(ids))
    if not wanted:
        return
    for attempt in range(1, MARK_TRIES + 1):
        try:
            with ledger.connection() as conn:
                conn.execute(MARK, {"ids": wanted})
            return
        except DeadlockDetected:
            if attempt == MARK_TRIES:
                raise
            time.sleep(0.01 * attempt)


def set_chord_size(ledger: Ledger, group_id: str, size: int) -> None:
    """Record the chord's size. A chord that already fired under this group id (a frozen
    chord applied again) starts a new count."""
    with ledger.connection() as conn, conn.transaction():
        ledger.durable(conn)
        row = conn.execute(
            "SELECT fired FROM synth_chords WHERE group_id = %s FOR UPDATE", (group_id,)
        ).fetchone()
        if row is not None and row[0]:
            conn.execute("DELETE FROM synth_chord_parts WHERE group_id = %s", (group_id,))
        conn.execute(
            "INSERT INTO synth_chords (group_id, size) VALUES (%s, %s) ON CONFLICT (group_id) "
            "DO UPDATE SET size = EXCLUDED.size, fired = false, callback_id = NULL, "
            "fired_at = NULL",
            (group_id, size),
        )


def record_chord(
    ledger: Ledger, group_id: str, callback: dict[str, Any], members: Sequence[str]
) -> None:
    """Record a chord being applied: its callback (a signature as a dict) and its header's
    part jobs in header order, so a part re-run from a message without its chord is counted
    (:func:`chord_of`)."""
    with ledger.connection() as conn, conn.transaction():
        ledger.durable(conn)
        conn.execute(
            "INSERT INTO synth_chords (group_id, callback) VALUES (%s, %s) "
            "ON CONFLICT (group_id) DO UPDATE SET callback = EXCLUDED.callback",
            (group_id, encode_result(callback)),
        )
        if members:
            conn.execute(
                "INSERT INTO synth_chord_members (job_id, group_id, index) "
                "SELECT m.job_id, %s, m.index - 1 FROM unnest(%s::text[]) "
                "WITH ORDINALITY AS m(job_id, index) ON CONFLICT (job_id) DO UPDATE "
                "SET group_id = EXCLUDED.group_id, index = EXCLUDED.index",
                (group_id, list(members)),
            )


def chord_of(ledger: Ledger, job_id: str) -> tuple[str, int | None, Any] | None:
    """The chord ``job_id`` is a header part of: (group id, index, callback), or ``None``."""
    with ledger.connection() as conn:
        row = conn.execute(
            "SELECT m.group_id, m.index, c.callback FROM synth_chord_members m "
            "JOIN synth_chords c USING (group_id) WHERE m.job_id = %s",
            (job_id,),
        ).fetchone()
    return None if row is None else (str(row[0]), row[1], row[2])


def add_to_chord(ledger: Ledger, group_id: str) -> None:
    """One more part joins the chord (Celery's ``Task.add_to_chord``)."""
    with ledger.connection() as conn:
        conn.execute("UPDATE synth_chords SET size = size + 1 WHERE group_id = %s", (group_id,))


@dataclass(frozen=True)
class ChordPart:
    """A finished header part as counted: its Celery state and its encoded result."""

    job_id: str
    state: str
    result: Any


#: Writes the callback's job row in the counting transaction (``conn``), given the parts in
#: header order, only when every part succeeded; returns the callback's job id.
Fire = Callable[["psycopg.Connection[Any]", Sequence[ChordPart]], str | None]


def record_chord_part(
    ledger: Ledger,
    group_id: str,
    job_id: str,
    index: int | None,
    state: str,
    result: Any,
    fire: Fire,
    failed_states: frozenset[str],
) -> list[ChordPart] | None:
    """Count a finished header part once; return every part, in header order, when this
    call completed the chord (``fire`` was called for an all-successful chord, in the same
    transaction), else ``None`` (not complete yet, already fired, or counted before).

    The chord's row is upserted first: it locks the row, so concurrent parts count one
    after another and the last one sees every part committed before it.
    """
    with ledger.connection() as conn, conn.transaction():
        ledger.durable(conn)
        row = conn.execute(
            "INSERT INTO synth_chords (group_id) VALUES (%s) ON CONFLICT (group_id) DO UPDATE "
            "SET group_id = EXCLUDED.group_id RETURNING size, fired",
            (group_id,),
        ).fetchone()
        assert row is not None
        size, fired = row
        conn.execute(
            "INSERT INTO synth_chord_parts (group_id, job_id, index, state, result) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (group_id, job_id) DO NOTHING",
            (group_id, job_id, index, state, encode_result(result)),
        )
        if fired or size is None:
            return None
        rows = conn.execute(
            "SELECT job_id, state, result FROM synth_chord_parts WHERE group_id = %s "
            "ORDER BY index NULLS LAST, finished_at",
            (group_id,),
        ).fetchall()
        if len(rows) < size:
            return None
        parts = [ChordPart(str(r[0]), str(r[1]), r[2]) for r in rows]
        callback_id = None
        if not any(p.state in failed_states for p in parts):
            callback_id = fire(conn, parts)
        conn.execute(
            "UPDATE synth_chords SET fired = true, fired_at = now(), callback_id = %s "
            "WHERE group_id = %s",
            (callback_id, group_id),
        )
    return parts
