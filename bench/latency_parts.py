"""Where an idle worker's start latency goes, plain Celery against the platform, stage by stage.

``bench/peers`` measures enqueue → task start as a whole; this splits it. With one worker
(prefork, 2 processes) idle on an empty queue, the client sends a probe job, waits for it to
start, pauses (uniform 0–2 × ``--gap``) and sends the next. Every process involved writes
``time.time()`` stamps (one machine, one clock) to a file of its own:

* **send**: the client's call (``apply_async`` / ``synth_workers.enqueue``) until it returns;
* **to the worker**: from before the send until the worker's main process has the message
  (Celery's ``task_received`` signal, after the platform's screening). It holds the send: the
  message is on its way while the call finishes (the platform's returns after its worker may
  already have the message), so only this sum compares the apps;
* **to the pool process**: until the pool process starts it (``task_prerun``);
* **claim** (platform): the pool process's claim of the job's ledger row, one Postgres round
  trip (``Fencing.claim``, stamped before and after by ``bench/latency_tasks.py``);
* **to the body**: the rest until the task's first line (Celery's tracer; the platform's
  runner around the claim);
* **total**: from before the send until the body: the sum of the stages after the send.

Medians per stage over the rounds' samples, both apps and their ratio, and the load average.
Each round runs both apps, the order alternating; each app's worker is started for its turn
and stopped after it.

Run from the repository root (Redis and Postgres running; the Redis database is flushed)::

    .venv/bin/python -m bench.latency_parts --redis-url redis://127.0.0.1:6379/14 \\
        --database-url postgresql://postgres@127.0.0.1:5432/bench

Exits 1 when a probe never started.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

#: Where stamps go: one file per process (set by the harness for its workers and itself).
STAMPS_ENV = "BENCH_STAMPS_DIR"
SCHEMA = "synth_bench_latency"
QUEUES = {"celery": "bench-latency-raw", "platform": "bench-latency-platform"}
MODULES = {"celery": "bench.latency_raw", "platform": "synth_workers"}
#: (label, from stamp, to stamp): the stages, in order; a stage whose stamps are missing (the
#: claim, for plain Celery) is left out for that app.
STAGES = (
    ("send", "t0", "sent"),
    ("to the worker", "t0", "received"),
    ("to the pool process", "received", "prerun"),
    ("claim", "claim", "claimed"),
    ("to the body (rest)", "prerun", "body"),
    ("total", "t0", "body"),
)

#: The probes push their ids here once stamped; the harness waits on it (``BLPOP``).
DONE_KEY = "bench:latency:done"

_file: tuple[int, Any] | None = None
_client: tuple[int, Any] | None = None


def stamp(tag: str, job_id: str) -> None:
    """Append ``job_id tag time`` to this process's stamp file (when the harness asked)."""
    global _file
    now = time.time()
    folder = os.environ.get(STAMPS_ENV)
    if not folder:
        return
    if _file is None or _file[0] != os.getpid():  # a forked pool process: a file of its own
        _file = (os.getpid(), open(Path(folder) / f"{os.getpid()}.txt", "a", buffering=1))  # noqa: SIM115
    _file[1].write(f"{job_id} {tag} {now:.6f}\n")


def done(job_id: str) -> None:
    """Tell the harness the probe ``job_id`` started (after its stamp: not measured)."""
    global _client
    import redis

    if _client is None or _client[0] != os.getpid():
        _client = (os.getpid(), redis.Redis.from_url(os.environ["BENCH_REDIS_URL"]))
    _client[1].lpush(DONE_KEY, job_id)


def stamp_signals() -> None:
    """Stamp Celery's ``task_received`` (main process) and ``task_prerun`` (pool process)."""
    from celery.signals import task_prerun, task_received

    def received(request: Any = None, **_: Any) -> None:
        stamp("received", request.id)

    def prerun(task_id: str = "", **_: Any) -> None:
        stamp("prerun", task_id)

    task_received.connect(received, weak=False, dispatch_uid="bench-latency-received")
    task_prerun.connect(prerun, weak=False, dispatch_uid="bench-latency-prerun")


def read_stamps(folder: Path) -> dict[str, dict[str, float]]:
    found: dict[str, dict[str, float]] = {}
    for path in folder.glob("*.txt"):
        for line in path.read_text().splitlines():
            job_id, tag, at = line.split()  # complete: read once the workers stopped
            found.setdefault(job_id, {})[tag] = float(at)
    return found


def stages(marks: dict[str, float]) -> dict[str, float]:
    """Milliseconds per stage of one probe; "to the body (rest)" less the claim."""
    out = {
        label: (marks[b] - marks[a]) * 1e3 for label, a, b in STAGES if a in marks and b in marks
    }
    if "claim" in out:
        out["to the body (rest)"] -= out["claim"]
    return out


def _ms(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=200, help="probes per app and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--gap", type=float, default=0.025, help="mean idle pause, seconds")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14"))
    p.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    p.add_argument("--out", default="bench/results/latency_parts.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    try:
        return measure(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure(args: argparse.Namespace, folder: Path) -> int:
    """Run the rounds with the stamps in ``folder``; print and write the report."""
    os.environ.update(
        {
            "REDIS_URL": args.redis_url,
            "BENCH_REDIS_URL": args.redis_url,
            "DATABASE_URL": args.database_url,
            "SYNTH_DB_SCHEMA": SCHEMA,
            "SYNTH_INCLUDE": "bench.latency_tasks",
            "SYNTH_LOG_LEVEL": "WARNING",
            STAMPS_ENV: str(folder),
        }
    )
    import redis

    from bench import drain, latency_raw
    from bench.peers.services import free_port
    from synth_workers import app, enqueue

    os.environ["SYNTH_METRICS_PORT"] = str(free_port())
    app.ledger.migrate()
    app.loader.import_default_modules()
    client = redis.Redis.from_url(args.redis_url)
    client.flushdb()
    sends = {
        "celery": lambda: latency_raw.probe.apply_async(queue=QUEUES["celery"]).id,
        "platform": lambda: (
            enqueue("bench.latency_platform_probe", {}, queue=QUEUES["platform"]).id
        ),
    }
    logs = Path("bench/results/logs")
    logs.mkdir(parents=True, exist_ok=True)
    per_app: dict[str, list[dict[str, float]]] = {"celery": [], "platform": []}
    loads = [os.getloadavg()[0]]
    missing = 0
    for rnd in range(args.rounds):
        for name in ("celery", "platform") if rnd % 2 == 0 else ("platform", "celery"):
            target = drain.Target(name, MODULES[name], QUEUES[name], "")
            control = app if name == "platform" else latency_raw.app
            side = drain.Side(target, client, control, lambda n: 0.0)
            node = f"latency-{name}-{rnd}@{os.uname().nodename}"
            proc = drain.start_worker(side, node, 2, logs / f"latency-{name}-r{rnd}.log")
            try:
                drain.wait_for_ping(side.control, node, proc, time.perf_counter())
                loads.append(os.getloadavg()[0])
                sent: dict[str, tuple[float, float]] = {}
                for n in range(args.samples + 3):  # the first three warm up, not kept
                    t0 = time.time()
                    job_id = sends[name]()
                    t1 = time.time()
                    while (got := client.blpop([DONE_KEY], timeout=10)) is not None:
                        if got[1].decode() == job_id:
                            break  # else a late one, given up on before
                    if n >= 3:
                        sent[job_id] = (t0, t1)
                    time.sleep(random.uniform(0, 2 * args.gap))  # noqa: S311 - a pause, not a secret
            finally:
                drain.stop_worker(proc)
            found = read_stamps(folder)
            for job_id, (t0, t1) in sent.items():
                marks = {**found.get(job_id, {}), "t0": t0, "sent": t1}
                if "body" not in marks:
                    missing += 1
                    continue
                per_app[name].append(stages(marks))
            print(f"round {rnd} {name}: {len(sent)} probes", flush=True)
    loads.append(os.getloadavg()[0])
    report: dict[str, Any] = {
        "samples": args.samples,
        "rounds": args.rounds,
        "load": loads,
        "probes": {name: len(rows) for name, rows in per_app.items()},
    }
    print(f"\nload average (1 min) {min(loads):.2f}-{max(loads):.2f}; medians, ms")
    print(f"{'stage':22s} {'celery':>8s} {'platform':>9s} {'ratio':>6s}")
    for label, _a, _b in STAGES:
        row = {}
        for name, rows in per_app.items():
            values = [r[label] for r in rows if label in r]
            row[name] = statistics.median(values) if values else None
        report[label] = row
        c, p = row["celery"], row["platform"]
        ratio = p / c if c and p else None
        print(f"{label:22s} {_ms(c):>8s} {_ms(p):>9s} {_ms(ratio, '.2f'):>6s}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    if missing:
        print(f"{missing} probe(s) never started")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
