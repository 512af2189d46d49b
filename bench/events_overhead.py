"""What job events cost: the platform's no-op backlog drain with events on vs off, same run.

Reuses ``bench.drain``'s pieces (its ``measure``: backlog, worker command, the ledger's end
check, CPU per job; see bench/README.md). Each round drains N no-op jobs twice with one worker
(``prefork -c 2``): once as shipped (``SYNTH_EVENTS_ENABLED=true``) and once with
``SYNTH_EVENTS_ENABLED=false`` for the worker (its own queue; the order alternates per
round). Per job the worker writes two events (``started``, ``succeeded``) and the history
archive stores them in the ledger; ``queued`` is written at enqueue, which is not timed.
Besides wall time it records the CPU milliseconds per job of the worker's processes,
Postgres and Redis (steadier than wall time on a shared machine).

Run from the repository root (Redis and Postgres running; a Redis database of your own)::

    .venv/bin/python -m bench.events_overhead --jobs 2000 --rounds 3 \\
        --redis-url redis://127.0.0.1:6379/10 --database-url postgresql://.../db

Target: events add at most 10% to the drain: ``consume_on / consume_off - 1 <= 0.10``
(per-round ratios of N / consume, median; ``consume`` = drain - first take). Exits 1 when a
run lost jobs or failed its checks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import drain  # noqa: E402

OFF = drain.Target(
    "platform-events-off", "synth_workers", "bench-platform-noevents", "bench.platform_noop", True
)
TARGET_OVERHEAD = 0.10


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.events_overhead", description=__doc__)
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per backlog (2000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode (3)")
    parser.add_argument("--concurrency", type=int, default=2, help="worker -c (2)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/10")
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "events_overhead.json"
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
    with contextlib.ExitStack() as stack:
        on = drain.local_side(drain.PLATFORM, client, args)
        env = {"SYNTH_EVENTS_ENABLED": "false"}
        off = drain.platform_variant(OFF, client, args.database_url, env)
        for side in (on, off):
            if side.ledger is not None:
                stack.callback(side.ledger.close)
        return report(args, [on, off], logs, out)


def report(args: argparse.Namespace, sides: list[drain.Side], logs: Path, out: Path) -> int:
    load = os.getloadavg()
    print(
        f"events overhead: {args.jobs} no-op jobs, {args.rounds} round(s) x (on, off), prefork "
        f"-c {args.concurrency}; load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    runs: list[drain.Run] = []
    for rnd in range(args.rounds):
        order = sides if rnd % 2 == 0 else sides[::-1]
        for side in order:
            run = drain.measure(side, rnd, args, logs)
            runs.append(run)
            status = "ok" if run.ok else "FAILED: " + "; ".join(run.errors)
            cpu = " ".join(f"{k} {v:.3f}" for k, v in run.cpu_ms_per_job.items())
            print(
                f"  round {rnd} {side.target.label:<19} consume {drain.fmt(run.consume_s)}s "
                f"{drain.fmt(run.consume_jobs_per_s, '.0f'):>6} jobs/s  CPU ms/job: {cpu}  "
                f"load {drain.fmt(run.load_1m)}  {status}"
            )
    rows = drain.per_round_ratios(runs, drain.PLATFORM.label, OFF.label)
    spread = drain.ratio_spread(rows, "consume")
    print("\nevents on / off per round (N / consume)")
    for row in rows:
        jobs = row["jobs_per_s_consume"]
        print(
            f"  round {row['round']}: {drain.fmt(jobs[drain.PLATFORM.label], '.0f')} / "
            f"{drain.fmt(jobs[OFF.label], '.0f')} jobs/s = {drain.fmt(row['consume'], '.3f')}"
        )
    medians = {s.target.label: drain.summarise(runs, s.target.label) for s in sides}
    cpu = {
        s.target.label: {
            part: statistics.median(
                r.cpu_ms_per_job[part] for r in runs if r.app == s.target.label and r.ok
            )
            for part in ("worker", "postgres", "redis")
            if any(r.ok and r.app == s.target.label for r in runs)
        }
        for s in sides
    }
    overhead = None if spread["median"] is None else 1 / spread["median"] - 1
    print(
        f"  median ratio {drain.fmt(spread['median'], '.3f')} (range "
        f"{drain.fmt(spread['min'], '.3f')}-{drain.fmt(spread['max'], '.3f')}): events add "
        f"{drain.fmt(None if overhead is None else 100 * overhead, '+.1f')}% to the drain "
        f"(target at most {100 * TARGET_OVERHEAD:.0f}%)"
    )
    for label, parts in cpu.items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in parts.items())
        print(f"  median CPU ms/job {label}: {shown}")
    failed = [r for r in runs if not r.ok]
    result: dict[str, Any] = {
        "benchmark": "events_overhead",
        "config": {
            "jobs": args.jobs,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "host": socket.gethostname(),
            "cpus": os.cpu_count(),
        },
        "runs": [{**asdict(r), "ok": r.ok} for r in runs],
        "median": medians,
        "cpu_ms_per_job": cpu,
        "per_round": rows,
        "on_vs_off": spread,
        "overhead": overhead,
        "target_overhead": TARGET_OVERHEAD,
        "ok": not failed,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
