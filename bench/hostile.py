"""Hostile-input benchmark: good jobs' throughput while bad messages are injected.

Two modes on the same worker command, in the same run, alternating order each round:

* ``clean``: N no-op platform jobs (``bench.platform_noop``) in the queue;
* ``hostile``: the same N jobs with B bad messages pushed straight onto the same Redis list
  between them, evenly spread, cycling through every class of ``tests/hostile_messages.py``
  (bad envelopes, bodies and headers, pickle/YAML/msgpack, a 256 MiB compression bomb,
  oversize, unknown tasks, expired, arguments that do not bind, ...).

Per mode and round: clean the queue and the ledger, enqueue with no worker running (not
timed), start one worker (prefork ``-c 2``, as ``bench/drain.py``) and measure from the
moment the backlog first shrinks to the last good job's ``finished_at`` in the ledger.
Throughput = N / that time. The run fails (exit 1) when a good job does not succeed, a bad
message is not dead-lettered, any hostile content ran, or the worker exits. The target:
hostile throughput >= 80 % of clean (the ratio never changes the exit status).

Run from the repository root::

    .venv/bin/python -m bench.hostile --jobs 3000 --bad 1000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make ``bench.*`` and ``tests.*`` importable
    sys.path.insert(0, str(REPO))

from bench import drain  # noqa: E402 - after the path set-up above

QUEUE = drain.PLATFORM.queue
TARGET = 0.8


@dataclass
class Run:
    mode: str
    round: int
    jobs: int
    bad: int
    first_take_s: float | None = None
    consume_s: float | None = None
    jobs_per_s: float | None = None
    dead: int = 0
    succeeded: int = 0
    errors: list[str] = field(default_factory=list)


def ledger_counts() -> tuple[int, int, float | None]:
    """(succeeded, dead, the last success's finished_at as a Unix time)."""
    from synth_workers import app

    with app.ledger.connection() as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE state = 'succeeded'), count(*) FILTER (WHERE state "
            "= 'dead'), extract(epoch FROM max(finished_at) FILTER (WHERE state = 'succeeded'))"
            " FROM synth_jobs"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), None if row[2] is None else float(row[2])


def bad_messages(count: int, canaries: Path) -> list[bytes]:
    from tests.hostile_messages import hostile_messages

    out: list[bytes] = []
    while len(out) < count:
        out.extend(m.raw for m in hostile_messages(QUEUE, canaries))
    return out[:count]


def measure(mode: str, rnd: int, args: argparse.Namespace, client: Any, logs: Path) -> Run:
    import synth_workers
    from tests.hostile_messages import queue_list

    bad = args.bad if mode == "hostile" else 0
    run = Run(mode, rnd, args.jobs, bad)
    drain.clean_redis(client, QUEUE)
    drain.ledger_reset()
    drain.clean_events(client)
    client.delete("test:count:hostile-ran")
    canaries = Path(tempfile.mkdtemp(prefix="hostile-canaries-"))
    messages = bad_messages(bad, canaries)
    every = max(1, args.jobs // bad) if bad else 0
    target = queue_list(QUEUE)
    for i in range(args.jobs):
        synth_workers.enqueue(drain.PLATFORM.task, {}, queue=QUEUE)
        if bad and i % every == 0 and messages:
            client.lpush(target, messages.pop())
    for message in messages:
        client.lpush(target, message)

    node = f"bench-hostile-{mode}-{rnd}@{socket.gethostname()}"
    log = logs / f"hostile-{mode}-{rnd}.log"
    waiting0 = drain.backlog(client, QUEUE)[0]
    proc = drain.start_worker(drain.PLATFORM, node, args.concurrency, log)
    t0 = time.time()
    first_take: float | None = None
    next_count = 0.0
    try:
        while time.time() - t0 < args.timeout:
            if proc.poll() is not None:
                run.errors.append(f"worker exited with {proc.returncode}")
                break
            now = time.time()
            if first_take is None and drain.backlog(client, QUEUE)[0] < waiting0:
                first_take = now
            if now >= next_count:
                next_count = now + 0.25
                run.succeeded, run.dead, last = ledger_counts()
                if run.succeeded == args.jobs and run.dead >= bad:
                    break
            time.sleep(drain.POLL_S)
        else:
            run.errors.append(f"not done within {args.timeout:.0f}s")
        if proc.poll() is not None and not run.errors:
            run.errors.append(f"worker exited with {proc.returncode}")
    finally:
        drain.stop_worker(proc)
    run.succeeded, run.dead, last = ledger_counts()
    if run.succeeded != args.jobs:
        run.errors.append(f"{run.succeeded} of {args.jobs} good jobs succeeded")
    if run.dead != bad:
        run.errors.append(f"{run.dead} of {bad} bad messages dead-lettered")
    if client.get("test:count:hostile-ran") is not None or any(canaries.iterdir()):
        run.errors.append("hostile content ran")
    if first_take is not None and last is not None:
        run.first_take_s = first_take - t0
        run.consume_s = last - first_take
        run.jobs_per_s = args.jobs / run.consume_s if run.consume_s > 0 else None
    return run


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=3000, help="good jobs per run")
    parser.add_argument("--bad", type=int, default=1000, help="bad messages per hostile run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/11")
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hostile.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    drain.configure_environment(args.redis_url, args.database_url)
    # the hostile messages name tasks of tests.e2e_tasks (so that one that ran would show)
    os.environ["SYNTH_INCLUDE"] += ",tests.e2e_tasks"
    import redis

    from synth_workers import app

    client = redis.Redis.from_url(args.redis_url)
    client.ping()
    app.ledger.migrate()
    drain.load_app(drain.PLATFORM)
    logs = args.out.resolve().parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(
        f"hostile benchmark: {args.jobs} good jobs, {args.bad} bad messages, {args.rounds} "
        f"round(s), prefork -c {args.concurrency}; worker logs in {logs}"
    )
    runs: list[Run] = []
    for rnd in range(args.rounds):
        for mode in ("clean", "hostile") if rnd % 2 == 0 else ("hostile", "clean"):
            run = measure(mode, rnd, args, client, logs)
            runs.append(run)
            status = "ok" if not run.errors else "FAILED: " + "; ".join(run.errors)
            print(
                f"  round {rnd} {mode:<8} first take {drain.fmt(run.first_take_s)}s  consume "
                f"{drain.fmt(run.consume_s)}s  {drain.fmt(run.jobs_per_s, '.0f')} good jobs/s  "
                f"dead {run.dead}  {status}"
            )
    clean = median([r.jobs_per_s for r in runs if r.mode == "clean"])
    hostile = median([r.jobs_per_s for r in runs if r.mode == "hostile"])
    ratio = drain.ratio(hostile, clean)
    # the same round's two runs are back to back: their ratio is less exposed to a machine
    # whose speed drifts between rounds
    paired = [
        drain.ratio(h.jobs_per_s, c.jobs_per_s)
        for c in runs
        for h in runs
        if c.mode == "clean" and h.mode == "hostile" and c.round == h.round
    ]
    paired_median = median(list(paired))
    print("per-round ratios: " + ", ".join(drain.fmt(r, ".3f") for r in paired))
    verdict = "-" if ratio is None else ("meets" if ratio >= TARGET else "below")
    print(
        f"medians: clean {drain.fmt(clean, '.0f')} jobs/s, hostile {drain.fmt(hostile, '.0f')} "
        f"jobs/s; ratio {drain.fmt(ratio, '.3f')} ({verdict} the {TARGET} target); median "
        f"of the per-round ratios {drain.fmt(paired_median, '.3f')}"
    )
    failed = [r for r in runs if r.errors]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "hostile",
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "runs": [asdict(r) for r in runs],
                "median_jobs_per_s": {"clean": clean, "hostile": hostile},
                "ratio": ratio,
                "paired_ratios": paired,
                "paired_ratio_median": paired_median,
                "target_ratio": TARGET,
                "ok": not failed,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
