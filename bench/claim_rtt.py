"""The claim's round trip against the least a write to Postgres costs, idle and back to back.

An idle worker's claim is the one Postgres round trip between a job's message and its body
(``latency_parts.py``). This times, on one connection each, set up as a worker's
(autocommit, ``synchronous_commit=off``, prepared statements):

* ``select1``: ``SELECT 1``, a round trip with no work;
* ``floor-write``: the write of ``bench.raw_app.roundtrip`` (peer ``celery-roundtrip``, drain
  ``--roundtrip``): an upsert of one small row;
* ``claim``: the platform's own claim statement (``synth_workers.ledger.fencing``) of a queued
  row in a real, migrated ledger (schema ``synth_bench_claim_rtt``, made anew each run).

**Idle**: each statement after a pause of 10–40 ms (uniform), the statements interleaved in a
random order, as a worker waiting for its next job would send them. **Back to back**: the
same statement ``--samples`` times in a row. Medians (and the 90th percentile) in ms.

Run from the repository root::

    .venv/bin/python -m bench.claim_rtt --database-url postgresql://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "synth_bench_claim_rtt"
STATEMENTS = ("select1", "floor-write", "claim")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    p.add_argument("--samples", type=int, default=250, help="per statement and way (250)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "claim_rtt.json"))
    args = p.parse_args(argv)
    if args.samples < 2:
        p.error("--samples must be >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["DATABASE_URL"] = args.database_url
    os.environ["SYNTH_DB_SCHEMA"] = SCHEMA
    import psycopg

    from bench.raw_app import ROUNDTRIP_CREATE, ROUNDTRIP_WRITE
    from synth_workers import app
    from synth_workers.ledger.fencing import _CLAIM_Q

    try:
        admin = psycopg.connect(args.database_url, autocommit=True)
    except psycopg.OperationalError as exc:
        print(f"error: Postgres is not reachable at --database-url: {exc}", file=sys.stderr)
        return 2
    admin.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    app.ledger.migrate()
    admin.execute(ROUNDTRIP_CREATE)
    ids = [str(uuid.uuid4()) for _ in range(2 * args.samples)]
    with admin.cursor() as cur:
        cur.executemany(
            f"INSERT INTO {SCHEMA}.synth_jobs (id, task, queue, priority, payload, state, "  # noqa: S608
            "max_attempts, published_at, maybe_waited) "
            "VALUES (%s, 'bench.x', 'q', 5, '{}', 'queued', 3, now(), false)",
            [(i,) for i in ids],
        )
    admin.execute(f"VACUUM ANALYZE {SCHEMA}.synth_jobs")
    conns = {
        name: psycopg.connect(
            args.database_url,
            autocommit=True,
            options=f"-c synchronous_commit=off -c search_path={SCHEMA}",
            prepare_threshold=0,
        )
        for name in STATEMENTS
    }

    def execute(name: str, i: int) -> float:
        conn = conns[name]
        t = time.perf_counter()
        if name == "select1":
            conn.execute("SELECT 1").fetchone()
        elif name == "floor-write":
            conn.execute(ROUNDTRIP_WRITE, (os.getpid(),))
        else:
            row = conn.execute(_CLAIM_Q, {"owner": "bench", "lease": 60, "id": ids[i]}).fetchone()
            if row is None:
                raise SystemExit(f"error: the claim of a queued row {ids[i]} found nothing")
        return time.perf_counter() - t

    for name in STATEMENTS:  # prepared, and the connections' first round trips made
        execute(name, len(ids) - 1 - STATEMENTS.index(name))
    idle: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    for i in range(args.samples - 3):
        for name in random.sample(STATEMENTS, len(STATEMENTS)):
            time.sleep(random.uniform(0.01, 0.04))  # noqa: S311 - a pause
            idle[name].append(execute(name, i))
    back: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    for name in STATEMENTS:
        for i in range(args.samples, 2 * args.samples - 3):
            back[name].append(execute(name, i))
    claimed = admin.execute(
        f"SELECT count(*) FROM {SCHEMA}.synth_jobs WHERE state = 'running'"  # noqa: S608
    ).fetchone()
    admin.execute(f"DROP SCHEMA {SCHEMA} CASCADE")

    def ms(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000, 3)

    report: dict[str, Any] = {
        "benchmark": "claim_rtt",
        "samples": args.samples,
        "claimed": int(claimed[0]) if claimed else 0,
        "statements": {
            name: {
                "idle_median_ms": round(statistics.median(idle[name]) * 1000, 3),
                "idle_p90_ms": ms(idle[name], 0.9),
                "back_to_back_median_ms": round(statistics.median(back[name]) * 1000, 3),
            }
            for name in STATEMENTS
        },
    }
    print(f"{'statement':<12}{'idle median':>13}{'idle p90':>10}{'back to back':>14}   (ms)")
    for name, row in report["statements"].items():
        print(
            f"{name:<12}{row['idle_median_ms']:>13.3f}{row['idle_p90_ms']:>10.3f}"
            f"{row['back_to_back_median_ms']:>14.3f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
