"""The ledger package's shape: small modules, every ``synth_jobs`` statement at home, and
the DLQ operations that now go through ``Ledger`` methods (real Postgres)."""

from __future__ import annotations

import re
from typing import Any

from synth_workers import app, enqueue
from synth_workers.deadletter import DeadLetterQueue, DLQFilter
from synth_workers.ledger.store import Ledger
from synth_workers.states import JobState

from .conftest import ROOT

PACKAGE = ROOT / "synth_workers"
#: A statement on the jobs table: a verb, then the table.
STATEMENT = re.compile(r"\b(FROM|UPDATE|INTO|JOIN)\s+synth_jobs\b", re.IGNORECASE)


def test_ledger_modules_stay_small() -> None:
    sizes = {p.name: len(p.read_text().splitlines()) for p in (PACKAGE / "ledger").glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 400} == {}


def test_jobs_table_statements_live_in_the_ledger_package() -> None:
    outside = [
        f"{p.relative_to(ROOT)}: {m.group(0)}"
        for p in sorted(PACKAGE.rglob("*.py"))
        if (PACKAGE / "ledger") not in p.parents
        for m in STATEMENT.finditer(p.read_text())
    ]
    assert outside == []


def _dead(key: str) -> str:
    h = enqueue("tests.e2e_tasks.side_effect", {"key": key}, queue="nobody")
    with app.ledger.connection() as conn:
        conn.execute(
            "UPDATE synth_jobs SET state = %s, failure_class = 'exception', finished_at = now() "
            "WHERE id = %s",
            (JobState.DEAD, h.id),
        )
    return h.id


def test_dlq_by_id_touches_dead_jobs_only(rclient: Any) -> None:
    dlq = DeadLetterQueue(app)
    dead = [_dead("layout-a"), _dead("layout-b")]
    alive = enqueue("tests.e2e_tasks.side_effect", {"key": "layout-c"}, queue="nobody").id
    task = DLQFilter(task="tests.e2e_tasks.side_effect")
    assert dlq.count(task) == 2
    assert {(r["task"], r["failure_class"]) for r in dlq.summary()} >= {
        ("tests.e2e_tasks.side_effect", "exception")
    }
    # a queued job's id among the ids: neither replayed nor purged
    assert dlq.purge(ids=[dead[0], alive]) == 1
    assert app.ledger.get(alive) is not None and app.ledger.get(dead[0]) is None
    assert [p[0] for p in dlq.replay(ids=[dead[1], alive])] == [dead[1]]
    assert dlq.count(task) == 1


def test_filters_compose_with_bound_values() -> None:
    where, params = Ledger.filters(states=(JobState.DEAD,), ids=["x"], task="t", older_than=5)
    with app.ledger.connection() as conn:
        text = where.as_string(conn)
    assert text == (
        "true AND state = ANY(%s) AND id = ANY(%s::uuid[]) AND task = %s AND "
        "coalesce(finished_at, enqueued_at) < now() - make_interval(secs => %s)"
    )
    assert params == [[JobState.DEAD], ["x"], "t", 5]
