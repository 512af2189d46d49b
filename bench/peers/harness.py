"""One round of one peer: bulk enqueue, single enqueue, drain, idle latency (and wait())."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.peers.peers import Context, Peer

if TYPE_CHECKING:
    import redis

REPO = Path(__file__).resolve().parents[2]
POLL_S = 0.01
CONFIRM_S = 0.2
STOP_TIMEOUT_S = 30.0
SETTLE_S = 0.5  # after a drain, before the latency probes: let the workers go idle
PROBLEM = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback")


@dataclass
class Options:
    jobs: int
    bulk_jobs: int
    samples: int
    gap_s: float
    timeout_s: float
    platform_bulk: str | None  # module:callable, or None: no platform bulk row
    logs: Path


@dataclass
class Run:
    peer: str
    round: int
    jobs: int
    load_1m: float = 0.0
    bulk_jobs: int = 0
    bulk_s: float | None = None
    bulk_per_s: float | None = None
    bulk_note: str = ""
    enqueued: int = 0  # jobs waiting after the single enqueues (must be ``jobs``)
    enqueue_s: float | None = None
    enqueue_per_s: float | None = None
    first_take_s: float | None = None  # worker start until the backlog first shrank
    drain_s: float | None = None  # first take until nothing is left
    drain_per_s: float | None = None  # jobs / drain_s
    drained: int | None = None  # jobs gone from the backlog (jobs - left)
    executed: int | None = None  # jobs the peer itself says it ran (None: it keeps no count)
    latency_s: list[float] = field(default_factory=list)  # enqueue -> task start
    wait_s: list[float] = field(default_factory=list)  # platform: enqueue -> wait() returned
    errors: list[str] = field(default_factory=list)
    log_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class ClientError(RuntimeError):
    """A peer's client process failed."""


def client_env(peer: Peer, ctx: Context) -> dict[str, str]:
    """This process's environment less ``SYNTH_*`` (the platform runs with its defaults; add
    settings with ``--platform-env``), plus the peer's own variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNTH_")}
    env.update(peer.env(ctx))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_client(peer: Peer, ctx: Context, *argv: str, timeout: float) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "bench.peers.client", peer.name, *argv],
        cwd=REPO,
        env=client_env(peer, ctx),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("BENCH-PEERS ")]
    if done.returncode or not lines:
        raise ClientError(
            f"{peer.name} client {' '.join(argv[:2])} exited {done.returncode}: "
            f"{(done.stdout + done.stderr)[-1500:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1].split(" ", 1)[1])
    return result


def start_workers(peer: Peer, ctx: Context, tag: str, logs: Path) -> list[subprocess.Popen[bytes]]:
    procs = []
    for i, argv in enumerate(peer.commands(peer, ctx, f"peers-{peer.name}-{tag}")):
        with (logs / f"{peer.name}-{tag}-{i}.log").open("wb") as out:
            procs.append(
                subprocess.Popen(
                    argv,
                    cwd=REPO,
                    env=client_env(peer, ctx),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
    return procs


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each worker's process group (its children too), SIGKILL if it lingers."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def log_problems(logs: Path, peer: Peer, tag: str, limit: int = 10) -> list[str]:
    found: list[str] = []
    for path in sorted(logs.glob(f"{peer.name}-{tag}-*.log")):
        found += [
            ln[:300] for ln in path.read_text(errors="replace").splitlines() if PROBLEM.search(ln)
        ]
    return found[:limit] + ([f"... and {len(found) - limit} more"] if len(found) > limit else [])


def reset(peer: Peer, client: redis.Redis, ctx: Context) -> None:
    client.flushdb()
    if peer.is_platform:
        ctx.ledger.reset()


def measure(peer: Peer, rnd: int, client: redis.Redis, ctx: Context, opt: Options) -> Run:
    run = Run(peer=peer.name, round=rnd, jobs=opt.jobs, load_1m=os.getloadavg()[0])
    try:
        _bulk(peer, run, client, ctx, opt)
        if not _enqueue(peer, run, client, ctx, opt):
            return run
        _drain_and_latency(peer, run, client, ctx, opt)
    except (ClientError, subprocess.TimeoutExpired) as exc:
        run.errors.append(str(exc))
    finally:
        reset(peer, client, ctx)
    return run


def _bulk(peer: Peer, run: Run, client: redis.Redis, ctx: Context, opt: Options) -> None:
    reset(peer, client, ctx)
    if peer.is_platform and opt.platform_bulk is None:
        run.bulk_note = "--platform-bulk none"
        return
    argv = ["bulk", str(opt.bulk_jobs)]
    if peer.is_platform and opt.platform_bulk:
        argv.append(opt.platform_bulk)
    try:
        out = run_client(peer, ctx, *argv, timeout=opt.timeout_s)
    except ClientError as exc:  # the bulk row is lost, not the round's other figures
        run.errors.append(f"bulk: {exc}")
        run.bulk_note = "bulk enqueue failed (see errors)"
        return
    if "unsupported" in out:
        run.bulk_note = str(out["unsupported"])
        return
    run.bulk_jobs = opt.bulk_jobs
    run.bulk_s = float(out["seconds"])
    run.bulk_per_s = opt.bulk_jobs / run.bulk_s if run.bulk_s > 0 else None
    waiting = peer.pending(client, ctx)
    if waiting != opt.bulk_jobs:
        run.errors.append(f"bulk: {waiting} jobs waiting after a bulk enqueue of {opt.bulk_jobs}")


def _enqueue(peer: Peer, run: Run, client: redis.Redis, ctx: Context, opt: Options) -> bool:
    """The single enqueues; False when the backlog is not what was enqueued."""
    reset(peer, client, ctx)
    out = run_client(peer, ctx, "enqueue", str(opt.jobs), timeout=opt.timeout_s)
    run.enqueue_s = float(out["seconds"])
    run.enqueue_per_s = opt.jobs / run.enqueue_s if run.enqueue_s > 0 else None
    run.enqueued = peer.pending(client, ctx)
    if run.enqueued != opt.jobs:
        run.errors.append(f"enqueue: {run.enqueued} jobs waiting after {opt.jobs} enqueues")
        return False
    return True


def _drain_and_latency(
    peer: Peer, run: Run, client: redis.Redis, ctx: Context, opt: Options
) -> None:
    tag = f"r{run.round}"
    t0 = time.perf_counter()
    procs = start_workers(peer, ctx, tag, opt.logs)
    try:
        end = _drain(peer, run, client, ctx, opt, procs, t0)
        if end is None:
            return
        left = peer.pending(client, ctx)
        run.drained = opt.jobs - left
        run.executed, problems = peer.verify(client, ctx, opt.jobs, f"peers-{peer.name}-{tag}")
        run.errors += problems
        time.sleep(SETTLE_S)
        key = f"bench:peers:probe:{peer.name}:{run.round}"
        out = run_client(
            peer, ctx, "latency", str(opt.samples), key, str(opt.gap_s), timeout=opt.timeout_s
        )
        run.latency_s = [float(x) for x in out["latencies"]]
        if peer.is_platform:
            out = run_client(
                peer, ctx, "wait", str(opt.samples), str(opt.gap_s), timeout=opt.timeout_s
            )
            run.wait_s = [float(x) for x in out["latencies"]]
    finally:
        stop_workers(procs)
        run.log_problems = log_problems(opt.logs, peer, tag)


def _drain(
    peer: Peer,
    run: Run,
    client: redis.Redis,
    ctx: Context,
    opt: Options,
    procs: list[subprocess.Popen[bytes]],
    t0: float,
) -> float | None:
    """Poll the backlog until it is empty (confirmed CONFIRM_S later); the end time."""
    first: float | None = None
    while True:
        now = time.perf_counter()
        if now - t0 > opt.timeout_s:
            run.errors.append(f"not drained within {opt.timeout_s:g}s")
            return None
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            run.errors.append(f"a worker exited with {dead[0].returncode} during the drain")
            return None
        left = peer.pending(client, ctx)
        if first is None and left < opt.jobs:
            first = now
        if left == 0:
            # a message can be popped before it is recorded as in flight (kombu, Huey):
            # confirm a moment later
            time.sleep(CONFIRM_S)
            if peer.pending(client, ctx) == 0:
                assert first is not None
                run.first_take_s = first - t0
                run.drain_s = now - first
                run.drain_per_s = opt.jobs / run.drain_s if run.drain_s > 0 else None
                return now
        time.sleep(POLL_S)
