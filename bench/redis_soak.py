"""Redis memory under a steady load: does it grow with throughput × retention?

Starts a Redis of its own (``redis-server`` on 127.0.0.1:``--port``, no persistence: others'
keys do not count), one platform worker (``prefork -c 2``, default settings), and enqueues
no-op jobs through ``synth_workers.enqueue`` at ``--rate`` jobs/s for ``--seconds`` (paced,
one producer thread). It records Redis ``used_memory`` and key count at the start, every 10 s
and at the end (once every job succeeded in the ledger), then again ``--settle`` seconds
later, plus the worker's RSS and open files (the whole process tree) after warm-up and at
the end.

Run from the repository root (Postgres running; the Redis is its own)::

    .venv/bin/python -m bench.redis_soak                       # 5 min at 100 jobs/s
    .venv/bin/python -m bench.redis_soak --seconds 60 --port 16401 \\
        --database-url postgresql://postgres@127.0.0.1:5432/synth_b

Targets (issue 14, at default settings): at the end Redis is at most 50 MB above its start
and holds under 2,000 keys, and every job succeeded. Exits 1 when one of them is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

QUEUE = "bench-soak"
TASK = "bench.platform_noop"
SCHEMA = "synth_soak"
MB = 1024 * 1024
MAX_GROWTH_MB = 50
MAX_KEYS = 2000


def start_redis(port: int, folder: Path) -> subprocess.Popen[bytes]:
    server = shutil.which("redis-server")
    if server is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    argv = [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly"]
    return subprocess.Popen(
        [*argv, "no", "--dir", str(folder), "--logfile", str(folder / "redis.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(0.05)
    raise SystemExit(f"{what} did not happen within {timeout:g}s (last error: {last!r})")


def tree(pid: int) -> tuple[int, int]:
    """RSS bytes and open files of a process and all its children."""
    rss = fds = 0
    for _pid, one_rss, one_fds in each_process(pid):
        rss += one_rss
        fds += one_fds
    return rss, fds


def each_process(pid: int) -> list[tuple[int, int, int]]:
    """(pid, RSS bytes, open files) of a process and each of its children."""
    import psutil

    found = []
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            found.append((proc.pid, proc.memory_info().rss, proc.num_fds()))
        except psutil.Error:
            continue
    return found


def redis_figures(client: Any) -> dict[str, Any]:
    prefixes: Counter[str] = Counter()
    for key in client.scan_iter(count=1000):
        name = key.decode(errors="replace")
        prefixes[name.rsplit(":", 1)[0] if name.startswith("synth:events:job:") else name] += 1
    top = dict(prefixes.most_common(8))
    return {
        "used_memory": int(client.info("memory")["used_memory"]),
        "keys": int(client.dbsize()),
        "top_keys": top,
    }


def succeeded(ledger: Any) -> int:
    with ledger.connection() as conn:
        row = conn.execute("SELECT count(*) FROM synth_jobs WHERE state = 'succeeded'").fetchone()
    return int(row[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_soak")
    parser.add_argument("--seconds", type=float, default=300.0, help="soak length (300)")
    parser.add_argument("--rate", type=float, default=100.0, help="jobs enqueued per second")
    parser.add_argument("--port", type=int, default=16401, help="the private Redis's port")
    parser.add_argument("--concurrency", type=int, default=2, help="worker -c (2)")
    parser.add_argument("--users", type=int, default=0, help="spread jobs over N user ids")
    parser.add_argument("--settle", type=float, default=15.0, help="seconds before re-measuring")
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "redis_soak.json")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="redis-soak-"))
    redis_proc = start_redis(args.port, folder)
    url = f"redis://127.0.0.1:{args.port}/0"
    os.environ.update(
        REDIS_URL=url,
        DATABASE_URL=args.database_url,
        SYNTH_DB_SCHEMA=SCHEMA,
        SYNTH_INCLUDE="bench.platform_tasks",
        SYNTH_METRICS_PORT="0",
    )
    import redis

    client = redis.Redis.from_url(url)
    worker: subprocess.Popen[bytes] | None = None
    try:
        wait_for(client.ping, 10, f"redis-server on port {args.port} answering")
        import bench.platform_tasks  # noqa: F401 - registers the no-op task
        from synth_workers import app, enqueue

        ledger = app.ledger
        ledger.migrate()
        with ledger.connection() as conn:
            conn.execute("TRUNCATE synth_jobs, synth_idempotency, synth_effects")
            for table in ("synth_job_events", "synth_job_history"):  # event history, old/new
                found = conn.execute("SELECT to_regclass(%s)", (table,)).fetchone()
                if found and found[0]:
                    conn.execute(f"TRUNCATE {table}")
        node = f"soak-{os.getpid()}@{socket.gethostname()}"
        log = folder / "worker.log"
        with log.open("wb") as out:
            argv = [sys.executable, "-m", "celery", "-A", "synth_workers", "worker", "-Q", QUEUE]
            argv += ["-n", node, "-P", "prefork", "-c", str(args.concurrency)]
            worker = subprocess.Popen(
                [*argv, "--without-mingle", "--without-gossip", "-l", "WARNING"],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(
            lambda: any(node in r for r in app.control.ping([node], timeout=0.5) or []),
            120,
            "the worker answering ping",
        )
        warm = 200
        for _ in range(warm):
            enqueue(TASK, {}, queue=QUEUE)
        wait_for(lambda: succeeded(ledger) == warm, 60, "the warm-up jobs succeeding")
        # the start is measured once the warm-up jobs' streams went (or after a minute, when
        # they do not go: the code before issue 14 keeps them an hour)
        grace = getattr(app.settings, "events_grace", None)  # None: before issue 14
        quiet = time.monotonic() + 60
        while client.dbsize() > 20 and time.monotonic() < quiet:
            time.sleep(0.5)
        time.sleep(1)
        start = redis_figures(client)
        rss0, fds0 = tree(worker.pid)
        per_process0 = [(p, round(r / MB, 1), f) for p, r, f in each_process(worker.pid)]
        print(
            f"soak: {args.rate:g} jobs/s for {args.seconds:g}s, worker prefork -c "
            f"{args.concurrency}, Redis on :{args.port}; start: {start['keys']} keys, "
            f"{start['used_memory'] / MB:.1f} MB; worker rss {rss0 / MB:.1f} MB, {fds0} fds"
        )
        total = int(args.seconds * args.rate)
        t0 = time.monotonic()
        samples: list[dict[str, Any]] = []
        next_sample = 10.0
        for n in range(total):
            due = t0 + n / args.rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            user = f"soak-user-{n % args.users}" if args.users else None
            enqueue(TASK, {}, queue=QUEUE, user_id=user)
            elapsed = time.monotonic() - t0
            if elapsed >= next_sample:
                figures = redis_figures(client)
                rss, fds = tree(worker.pid)
                sample = {"t": round(elapsed, 1), "enqueued": n + 1, **figures, "rss": rss}
                sample["fds"] = fds
                samples.append(sample)
                print(
                    f"  t={elapsed:5.0f}s enqueued {n + 1:>6}  keys {figures['keys']:>6}  "
                    f"used {figures['used_memory'] / MB:7.1f} MB  worker rss {rss / MB:.1f} MB "
                    f"{fds} fds  load {os.getloadavg()[0]:.1f}"
                )
                next_sample += 10.0
        enqueue_s = time.monotonic() - t0
        wait_for(lambda: succeeded(ledger) >= warm + total, 300, "every job succeeding")
        drained_s = time.monotonic() - t0
        end = redis_figures(client)
        rss1, fds1 = tree(worker.pid)
        per_process = [(p, round(r / MB, 1), f) for p, r, f in each_process(worker.pid)]
        time.sleep(args.settle)
        settled = redis_figures(client)
        done = succeeded(ledger) - warm
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(60)
        client.close()
        os.killpg(redis_proc.pid, signal.SIGTERM)
        redis_proc.wait(30)

    growth = end["used_memory"] - start["used_memory"]
    result = {
        "rate": args.rate,
        "seconds": args.seconds,
        "jobs": total,
        "succeeded": done,
        "enqueue_s": round(enqueue_s, 1),
        "all_succeeded_s": round(drained_s, 1),
        "start": start,
        "end": end,
        "settled": settled,
        "used_memory_growth_mb": round(growth / MB, 2),
        "worker": {"rss_start": rss0, "rss_end": rss1, "fds_start": fds0, "fds_end": fds1},
        "worker_processes": {"start": per_process0, "end": per_process},
        "samples": samples,
        "load": os.getloadavg(),
        "events_grace": grace,
        "events_retention": app.settings.events_retention,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    checks = {
        f"all {total} jobs succeeded": done == total,
        f"used_memory growth {growth / MB:.1f} MB <= {MAX_GROWTH_MB} MB": growth
        <= MAX_GROWTH_MB * MB,
        f"keys at the end {end['keys']} < {MAX_KEYS}": end["keys"] < MAX_KEYS,
    }
    print(f"enqueued {total} jobs in {enqueue_s:.0f}s ({total / enqueue_s:.0f} jobs/s achieved)")
    print(
        f"end (all succeeded, {drained_s:.0f}s): {end['keys']} keys, "
        f"{end['used_memory'] / MB:.1f} MB ({growth / MB:+.1f} MB); after {args.settle:g}s: "
        f"{settled['keys']} keys, {settled['used_memory'] / MB:.1f} MB; top keys {end['top_keys']}"
    )
    print(
        f"worker: rss {rss0 / MB:.1f} -> {rss1 / MB:.1f} MB ({(rss1 / rss0 - 1) * 100:+.1f} %), "
        f"open files {fds0} -> {fds1}; load {os.getloadavg()[0]:.1f}; written to {args.out}"
    )
    print(f"worker processes (pid, rss MB, open files): {per_process0} -> {per_process}")
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'MISS'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
