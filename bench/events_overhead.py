"""What job events cost: the platform's no-op backlog drain with events on vs off, same run.

Reuses ``bench.drain``'s platform pieces (queue, no-op task, worker command, backlog poll;
see bench/README.md). Each round drains N no-op jobs twice with one worker
(``prefork -c 2``), once with ``SYNTH_EVENTS_ENABLED=true`` and once with ``false`` (the
order alternates per round), from the worker's process start until the queue is empty and
nothing is unacked. Per job the worker writes two events (``started``, ``succeeded``);
``queued`` is written at enqueue, which is not timed. Besides wall time it records the CPU
seconds the worker's processes and Redis spent (steadier than wall time on a shared machine).

Run from the repository root (Redis and Postgres running; a Redis database of your own)::

    .venv/bin/python -m bench.events_overhead --jobs 2000 --rounds 5 \\
        --redis-url redis://127.0.0.1:6379/10 --database-url postgresql://.../db

Target: events add at most 10% to the drain: ``consume_on / consume_off - 1 <= 0.10``
(medians, ``consume`` = drain - first take). Exits 1 when a run lost jobs, or when with
events on a job's stream does not end with its ``succeeded`` event.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import drain  # noqa: E402

TARGET = drain.PLATFORM


@dataclass
class Run:
    mode: str
    round: int
    jobs: int
    drain_s: float | None = None
    first_take_s: float | None = None
    consume_s: float | None = None
    worker_cpu_s: float | None = None
    redis_cpu_s: float | None = None
    events_final: int = 0
    errors: list[str] = field(default_factory=list)


def clear_events(client: Any) -> None:
    keys = list(client.scan_iter(match="synth:events:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])


def count_final_events(client: Any) -> int:
    """Jobs of this round whose events end with ``succeeded``: in their own stream, or in
    the ledger's copy once the stream went (``SYNTH_EVENTS_GRACE`` after the job ended)."""
    done: set[str] = set()
    for key in client.scan_iter(match="synth:events:job:*", count=1000):
        last = client.xrevrange(key, count=1)
        if last and last[0][1].get(b"kind") == b"succeeded":
            done.add(key.decode().rsplit(":", 1)[1])
    from synth_workers import app as synth

    with synth.ledger.connection() as conn:  # the round's jobs only (synth_jobs is reset)
        rows = conn.execute(
            "SELECT h.job_id::text FROM synth_job_history h JOIN synth_jobs j ON j.id = h.job_id "
            'WHERE h.events @> \'[[{"kind": "succeeded"}]]\''
        ).fetchall()
    return len(done | {r[0] for r in rows})


def redis_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def tree_cpu(pid: int) -> float:
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def measure(mode: str, rnd: int, args: argparse.Namespace, client: Any, logs: Path) -> Run:
    run = Run(mode, rnd, args.jobs)
    drain.clean_redis(client, TARGET.queue)
    drain.ledger_reset()
    clear_events(client)
    drain.enqueue_platform(args.jobs)
    if drain.backlog(client, TARGET.queue) != (args.jobs, 0):
        run.errors.append("the backlog is not as enqueued")
        return run
    node = f"events-{mode}-r{rnd}@{socket.gethostname()}"
    cpu0 = redis_cpu(client)
    t0 = time.perf_counter()
    proc = drain.start_worker(TARGET, node, args.concurrency, logs / f"events-{mode}-r{rnd}.log")
    try:
        first = None
        while True:
            now = time.perf_counter()
            if now - t0 > args.timeout:
                run.errors.append(f"not drained within {args.timeout:g}s")
                break
            if proc.poll() is not None:
                run.errors.append(f"worker exited with {proc.returncode}")
                break
            state = drain.backlog(client, TARGET.queue)
            if first is None and state != (args.jobs, 0):
                first = now
            if state == (0, 0):
                end = now
                time.sleep(drain.CONFIRM_S)
                if drain.backlog(client, TARGET.queue) == (0, 0):
                    run.drain_s = end - t0
                    run.first_take_s = None if first is None else first - t0
                    if first is not None:
                        run.consume_s = end - first
                    break
            time.sleep(drain.POLL_S)
        run.worker_cpu_s = tree_cpu(proc.pid)
        run.redis_cpu_s = redis_cpu(client) - cpu0
    finally:
        drain.stop_worker(proc)
    states, _late = drain.ledger_states()
    if states.get("succeeded", 0) != args.jobs:
        run.errors.append(f"ledger: {states}")
    time.sleep(0.1)  # the last events leave the worker's buffer at its shutdown at the latest
    run.events_final = count_final_events(client)
    if mode == "on" and run.events_final != args.jobs:
        run.errors.append(f"events: {run.events_final} of {args.jobs} jobs have 'succeeded'")
    if mode == "off" and run.events_final:
        run.errors.append(f"events off, yet {run.events_final} jobs have events")
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.events_overhead")
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per backlog (2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, each on and off (5)")
    parser.add_argument("--concurrency", type=int, default=2, help="worker -c (2)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "events_overhead.json"
    )
    args = parser.parse_args(argv)
    drain.configure_environment(args.redis_url, args.database_url)
    os.environ["SYNTH_EVENTS_ENABLED"] = "true"

    import redis as redis_lib

    from synth_workers import app as synth
    from synth_workers.events import EventBuffer

    listeners = [f for f in synth.lifecycle._listeners if isinstance(f, EventBuffer)]
    client = redis_lib.Redis.from_url(args.redis_url)
    client.ping()
    synth.ledger.migrate()
    drain.load_app(TARGET)
    args.out = args.out.resolve()
    logs = args.out.parent / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    runs: list[Run] = []
    print(
        f"events overhead: {args.jobs} no-op jobs, {args.rounds} round(s) x (on, off), "
        f"prefork -c {args.concurrency}"
    )
    for rnd in range(args.rounds):
        for mode in ("on", "off") if rnd % 2 == 0 else ("off", "on"):
            os.environ["SYNTH_EVENTS_ENABLED"] = "true" if mode == "on" else "false"
            for listener in listeners:  # this process (the producer) follows the setting too
                if mode == "on":
                    synth.lifecycle.connect(listener)
                else:
                    synth.lifecycle.disconnect(listener)
            run = measure(mode, rnd, args, client, logs)
            runs.append(run)
            status = "ok" if not run.errors else "FAILED: " + "; ".join(run.errors)
            print(
                f"  round {rnd} events {mode:<3}  drain {drain.fmt(run.drain_s)}s  consume "
                f"{drain.fmt(run.consume_s)}s  worker cpu {drain.fmt(run.worker_cpu_s)}s  "
                f"redis cpu {drain.fmt(run.redis_cpu_s)}s  load {os.getloadavg()[0]:.1f}  {status}"
            )
    clear_events(client)

    def med(mode: str, attr: str) -> float | None:
        values = [getattr(r, attr) for r in runs if r.mode == mode]
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    def added(attr: str) -> float | None:
        on, off = med("on", attr), med("off", attr)
        return on / off - 1 if on is not None and off else None

    summary = {
        attr: {"on": med("on", attr), "off": med("off", attr), "added": added(attr)}
        for attr in ("consume_s", "drain_s", "worker_cpu_s", "redis_cpu_s")
    }
    print()
    print(f"medians over {args.rounds} round(s), N = {args.jobs}:")
    for attr, s in summary.items():
        pct = None if s["added"] is None else s["added"] * 100
        print(
            f"  {attr:<13} on {drain.fmt(s['on'], '.3f'):>7}  off {drain.fmt(s['off'], '.3f'):>7}"
            f"  events add {drain.fmt(pct, '+.1f')}%"
        )
    verdict = summary["consume_s"]["added"]
    if verdict is not None:
        print(
            f"target: events add <= 10% to the drain (consume): "
            f"{'met' if verdict <= 0.10 else 'NOT met'}"
        )
    failed = [r for r in runs if r.errors]
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "events_overhead",
                "config": {
                    "jobs": args.jobs,
                    "rounds": args.rounds,
                    "concurrency": args.concurrency,
                },
                "runs": [asdict(r) for r in runs],
                "median": summary,
                "target_added": 0.10,
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
