"""Drain benchmark of the batched mode (``SYNTH_WORKER_MODE=batched``) against plain Celery.

Three apps, measured in the same run by ``bench/drain.py``'s own harness (same backlog, same
worker command: prefork, ``-c 2``, prefetch 1, acks late; round order rotated each round):

* ``raw``: plain Celery (``bench/raw_app.py``), no result backend;
* ``platform``: the platform in its default mode;
* ``platform-batched``: the same worker command with ``SYNTH_WORKER_MODE=batched`` and
  ``SYNTH_BATCH_SIZE`` (``--batch-size``), on a queue of its own.

The figure to read is ``platform-batched / raw`` of ``N / (drain - first take)`` per round,
with its median and range (target: 2.0); both raw jobs/s figures are printed for every round,
with the machine's load before each drain. Run from the repository root::

    .venv/bin/python -m bench.drain_batched --jobs 5000 --rounds 3

Exits non-zero when a run lost jobs (the harness's checks: queue drained, N ledger rows
succeeded); the ratios never change the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import drain  # noqa: E402

BATCHED = drain.Target(
    "platform-batched", "synth_workers", "bench-platform-batched", "bench.platform_noop", True
)
TARGET_RATIO = 2.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.drain_batched", description=__doc__)
    parser.add_argument("--jobs", type=int, default=5000, help="jobs per backlog (5000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per app (3)")
    parser.add_argument("--concurrency", type=int, default=2, help="worker -c (2)")
    parser.add_argument("--batch-size", type=int, default=16, help="SYNTH_BATCH_SIZE (16)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--no-default", action="store_true", help="leave out the platform's default mode"
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "drain_batched.json"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    drain.configure_environment(args.redis_url, args.database_url)
    import redis as redis_lib

    from synth_workers import app as synth

    out = args.out.resolve()
    logs = out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    client = redis_lib.Redis.from_url(args.redis_url)
    client.ping()
    synth.ledger.migrate()
    drain.load_app(drain.PLATFORM)
    env = {"SYNTH_WORKER_MODE": "batched", "SYNTH_BATCH_SIZE": str(args.batch_size)}
    targets = [drain.RAW] + ([] if args.no_default else [drain.PLATFORM])
    with contextlib.ExitStack() as stack:
        sides = [drain.local_side(t, client, args) for t in targets]
        sides.append(drain.platform_variant(BATCHED, client, args.database_url, env))
        for side in sides:
            if side.ledger is not None:
                stack.callback(side.ledger.close)
        return report(args, sides, logs, out)


def report(args: argparse.Namespace, sides: list[drain.Side], logs: Path, out: Path) -> int:
    load = os.getloadavg()
    print(
        f"batched drain: {args.jobs} no-op jobs, {args.rounds} round(s), prefork -c "
        f"{args.concurrency}, SYNTH_BATCH_SIZE={args.batch_size}; load {load[0]:.2f} "
        f"{load[1]:.2f} {load[2]:.2f}"
    )
    runs: list[drain.Run] = []
    for rnd in range(args.rounds):
        shift = rnd % len(sides)
        for side in sides[shift:] + sides[:shift]:
            run = drain.measure(side, rnd, args, logs)
            runs.append(run)
            status = "ok" if run.ok else "FAILED: " + "; ".join(run.errors)
            print(
                f"  round {rnd} {side.target.label:<17} consume {drain.fmt(run.consume_s)}s "
                f"{drain.fmt(run.consume_jobs_per_s, '.0f'):>6} jobs/s  net "
                f"{drain.fmt(run.jobs_per_s, '.0f'):>6} jobs/s  load {drain.fmt(run.load_1m)}  "
                f"{status}"
            )
            for line in run.log_problems[:5]:
                print(f"      log: {line}")
    rows = drain.per_round_ratios(runs, BATCHED.label, drain.RAW.label)
    spread = {name: drain.ratio_spread(rows, name) for name in drain.RATIO_FIGURES}
    print(f"\nplatform-batched / raw per round (N / consume; target {TARGET_RATIO})")
    for row in rows:
        jobs = row["jobs_per_s_consume"]
        print(
            f"  round {row['round']}: {drain.fmt(jobs[BATCHED.label], '.0f')} / "
            f"{drain.fmt(jobs[drain.RAW.label], '.0f')} jobs/s = {drain.fmt(row['consume'], '.3f')}"
        )
    sp = spread["consume"]
    print(
        f"  median {drain.fmt(sp['median'], '.3f')}, range {drain.fmt(sp['min'], '.3f')}-"
        f"{drain.fmt(sp['max'], '.3f')}"
    )
    medians = {s.target.label: drain.summarise(runs, s.target.label) for s in sides}
    for label, m in medians.items():
        print(f"  median {label}: {drain.fmt(m['consume_jobs_per_s'], '.0f')} jobs/s")
    loads = [r.load_1m for r in runs if r.load_1m is not None]
    end = os.getloadavg()
    print(
        f"load (1 min) before each drain {drain.fmt(min(loads, default=None))}-"
        f"{drain.fmt(max(loads, default=None))}; at the end {end[0]:.2f}"
    )
    failed = [r for r in runs if not r.ok]
    result: dict[str, Any] = {
        "benchmark": "drain_batched",
        "config": {
            "jobs": args.jobs,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "batch_size": args.batch_size,
            "host": socket.gethostname(),
            "cpus": os.cpu_count(),
        },
        "runs": [{**asdict(r), "ok": r.ok} for r in runs],
        "median": medians,
        "per_round": rows,
        "batched_vs_raw": spread,
        "target_ratio": TARGET_RATIO,
        "ok": not failed,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
