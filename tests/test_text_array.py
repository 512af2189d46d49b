"""``text_array``: the ledger sends arrays (completions, event history) as one array literal,
which Postgres must read back exactly, whatever the texts hold."""

from __future__ import annotations

import json

import psycopg

from synth_workers.ledger.rows import text_array

TEXTS = ["", "NULL", "null", 'a"b', "back\\slash", '\\"', "{x,y}", " spaced ", "é∑😀", "a\nb"]


def test_text_array_round_trips_any_text(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT %s::text[]", (text_array(TEXTS),)).fetchone()
        assert row is not None and row[0] == TEXTS
        values = [{"q": 'say "hi" \\'}, "x", None, [1, "{", "}"], TEXTS]
        row = conn.execute(
            "SELECT %s::jsonb[]", (text_array(json.dumps(v) for v in values),)
        ).fetchone()
        assert row is not None and row[0] == values
        row = conn.execute("SELECT %s::int[]", (text_array(["1", "-2"]),)).fetchone()
        assert row is not None and row[0] == [1, -2]
        row = conn.execute("SELECT cardinality(%s::uuid[])", (text_array([]),)).fetchone()
        assert row is not None and row[0] == 0
