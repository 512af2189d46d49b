"""``python -m bench.peers``: parse the options, start the private Redis, run the rounds, report."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.peers.harness import REPO, Options, Run, client_env, measure
from bench.peers.peers import (
    BY_NAME,
    DEFAULT_PLATFORM_WORKER_ARGS,
    LEDGER_SCHEMA,
    PEERS,
    Context,
    platform_variant,
)
from bench.peers.report import (
    COLUMNS,
    cell,
    machine,
    markdown,
    per_round,
    ratio_table,
    ratios,
    summarise,
)
from bench.peers.services import (
    Ledger,
    RedisMissingError,
    RedisServer,
    ServiceError,
    free_port,
)

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/synth_a"
MODULES = {"huey": "huey", "dramatiq": "dramatiq", "rq": "rq", "arq": "arq"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.peers",
        description="Plain Celery, Huey, Dramatiq, RQ, arq and the platform side by side on a "
        "private Redis: single and bulk enqueue, backlog drain, idle latency.",
    )
    p.add_argument("--jobs", type=int, default=20_000, help="jobs per enqueue and drain (20000)")
    p.add_argument("--bulk-jobs", type=int, default=None, help="jobs per bulk enqueue (--jobs)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, peers interleaved (3)")
    p.add_argument("--samples", type=int, default=100, help="latency probes per round (100)")
    p.add_argument(
        "--gap",
        type=float,
        default=0.025,
        help="mean idle seconds between probes, uniform in 0 to twice this (0.025)",
    )
    p.add_argument(
        "--jobs-for",
        action="append",
        default=[],
        metavar="PEER=N",
        help="jobs per enqueue, bulk and drain for one peer instead of --jobs (repeatable), "
        "e.g. rq=2000 for RQ's fork per job",
    )
    p.add_argument("--only", default="", help="comma-separated peers: " + ",".join(BY_NAME))
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 300 jobs, 1 round, 20 probes (explicit flags still win)",
    )
    p.add_argument(
        "--redis-port",
        type=int,
        default=0,
        help="port of the private redis-server (0: first free in 16300-16399)",
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_PEERS_DATABASE_URL") or DEFAULT_DATABASE_URL,
        help="the platform's Postgres (ledger schema synth_bench_peers); default "
        "$BENCH_PEERS_DATABASE_URL, else " + DEFAULT_DATABASE_URL,
    )
    p.add_argument(
        "--platform-worker-args",
        default=DEFAULT_PLATFORM_WORKER_ARGS,
        help="appended to `celery -A synth_workers worker -Q ... -n ... "
        f"--without-mingle --without-gossip -l WARNING` ({DEFAULT_PLATFORM_WORKER_ARGS!r})",
    )
    p.add_argument(
        "--platform-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the platform's workers and client "
        "(repeatable), e.g. a consumption mode's setting",
    )
    p.add_argument(
        "--platform-variant",
        action="append",
        default=[],
        metavar="LABEL:NAME=VALUE[,NAME=VALUE...]",
        help="also measure the platform with these settings as peer platform-LABEL, in the "
        "same rounds (repeatable), e.g. batched:SYNTH_WORKER_MODE=batched,SYNTH_BATCH_SIZE=16",
    )
    p.add_argument(
        "--platform-bulk",
        default="synth_workers:enqueue_many",
        help="module:callable used as enqueue_many(task_name, payloads, queue=) for "
        "the platform's bulk row; the row is skipped with a note when it does not "
        "exist; 'none' skips it (synth_workers:enqueue_many)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="seconds one enqueue, drain or probe series may take (900)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results" / "peers.json",
        help="the JSON results; the Markdown table goes next to it (.md)",
    )
    quick = {"jobs": 300, "rounds": 1, "samples": 20}
    args = p.parse_args(argv)
    if args.quick:
        given = set(argv if argv is not None else sys.argv[1:])
        for name, value in quick.items():
            if f"--{name}" not in given:
                setattr(args, name, value)
    if args.bulk_jobs is None:
        args.bulk_jobs = args.jobs
    if min(args.jobs, args.bulk_jobs, args.rounds, args.samples) < 1:
        p.error("--jobs, --bulk-jobs, --rounds and --samples must be >= 1")
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        p.error(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    args.peers = [peer for peer in PEERS if peer.name in names]
    for i, item in enumerate(args.platform_variant):
        label, _, pairs = item.partition(":")
        settings = dict(pair.partition("=")[::2] for pair in pairs.split(",") if pair)
        if not re.fullmatch(r"[a-z0-9]+", label) or not settings or not all(settings):
            p.error(f"--platform-variant takes LABEL:NAME=VALUE[,...], got {item!r}")
        if f"platform-{label}" in {peer.name for peer in args.peers}:
            p.error(f"--platform-variant {label!r} is given twice")
        args.peers.append(platform_variant(label, settings, i))
    env: dict[str, str] = {}
    for item in args.platform_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--platform-env takes NAME=VALUE, got {item!r}")
        env[name] = value
    args.platform_env = env
    jobs_for: dict[str, int] = {}
    for item in args.jobs_for:
        name, sep, value = item.partition("=")
        if not sep or name not in BY_NAME or not value.isdigit() or int(value) < 1:
            p.error(f"--jobs-for takes PEER=N with a known peer and N >= 1, got {item!r}")
        jobs_for[name] = int(value)
    args.jobs_for = jobs_for
    if args.platform_bulk.lower() == "none":
        args.platform_bulk = None
    missing = sorted(
        {
            MODULES[k]
            for k in (p.name.split("-", maxsplit=1)[0] for p in args.peers)
            if k in MODULES and importlib.util.find_spec(MODULES[k]) is None
        }
    )
    if missing:
        p.error(
            f"not installed: {', '.join(missing)}; run `pip install -e '.[bench]'` "
            "or leave them out with --only"
        )
    return args


def migrate(ctx: Context) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "synth_workers.cli", "db", "migrate"],
        cwd=REPO,
        env=client_env(BY_NAME["platform"], ctx),
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if done.returncode:
        raise ServiceError(f"`synth-workers db migrate` failed:\n{done.stdout}{done.stderr}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    out: Path = args.out.resolve()
    logs = out.parent / "logs-peers"
    logs.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        server = start_redis(args.redis_port)
        port = server.port
        stack.callback(server.stop)
        ctx = Context(
            server.url,
            args.database_url,
            args.platform_worker_args,
            args.platform_env,
            metrics_port=free_port(skip={port}),
        )
        if any(p.is_platform for p in args.peers):
            ledger = Ledger(args.database_url, LEDGER_SCHEMA)
            stack.callback(ledger.close)
            migrate(ctx)
            ctx.ledger = ledger
        return rounds(args, server, ctx, out, logs)
    return 2  # not reached: the stack does not swallow exceptions


def start_redis(port: int) -> RedisServer:
    """The private redis-server on ``port``, or (0) on a free port of the range, trying the
    next free one when another process took it in between."""
    if port:
        return RedisServer(port)
    tried: set[int] = set()
    for _ in range(5):
        candidate = free_port(skip=tried)
        tried.add(candidate)
        try:
            return RedisServer(candidate)
        except RedisMissingError:
            raise
        except ServiceError:
            continue
    raise ServiceError(f"redis-server did not start on any of the ports {sorted(tried)}")


def rounds(
    args: argparse.Namespace, server: RedisServer, ctx: Context, out: Path, logs: Path
) -> int:
    import redis

    from synth_workers.settings import mask_url

    started = datetime.datetime.now(datetime.UTC)
    load_start = os.getloadavg()
    info = machine(server.version)
    commit_ms = [ctx.ledger.commit_ms()] if ctx.ledger is not None else []
    opt = Options(
        args.jobs, args.bulk_jobs, args.samples, args.gap, args.timeout, args.platform_bulk, logs
    )
    print(
        f"peers benchmark {started:%Y-%m-%d %H:%M} UTC: {args.jobs} jobs, {args.rounds} "
        f"round(s), {args.samples} probes; {info['cpu_model']}, {info['cores']} cores; "
        f"redis-server {server.version} on port {server.port}; load average "
        f"{load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    if commit_ms:
        print(f"Postgres one-row insert + commit: median {commit_ms[0]:.2f} ms (now)")
    for peer in args.peers:
        print(f"  {peer.name:<12} {peer.settings}")
    runs: list[Run] = []
    clients = {p.name: redis.Redis.from_url(ctx.url(p.db)) for p in args.peers}
    peers = list(args.peers)
    for rnd in range(args.rounds):
        shift = rnd % len(peers)
        for peer in peers[shift:] + peers[:shift]:  # rotate: drift hits every peer alike
            n = args.jobs_for.get(peer.name)
            mine = opt if n is None else dataclasses.replace(opt, jobs=n, bulk_jobs=n)
            run = measure(peer, rnd, clients[peer.name], ctx, mine)
            runs.append(run)
            print_run(run)
    load_end = os.getloadavg()
    names = [p.name for p in args.peers]
    summary = summarise(runs, names)
    versus = ratios(runs, names)
    table = markdown(summary, args.rounds)
    if versus:
        table += "\n\n" + ratio_table(versus)
    loads = [r.load_1m for r in runs]
    print()
    print(f"median over {args.rounds} round(s) (range); rates in jobs/s, latencies in ms")
    print(table)
    if ctx.ledger is not None:
        commit_ms.append(ctx.ledger.commit_ms())
    print(
        f"load average (1 min) before each measurement {min(loads):.2f}-{max(loads):.2f}; "
        f"at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}"
        + (
            f"; Postgres insert + commit {commit_ms[0]:.2f} -> {commit_ms[-1]:.2f} ms"
            if commit_ms
            else ""
        )
    )
    result: dict[str, Any] = {
        "benchmark": "peers",
        "date": started.isoformat(timespec="seconds"),
        "machine": {
            **info,
            "loadavg_start": list(load_start),
            "loadavg_end": list(load_end),
            "postgres_commit_ms_start_end": commit_ms,
            "loadavg_1m_range": [min(loads), max(loads)],
        },
        "config": {
            "jobs": args.jobs,
            "jobs_for": args.jobs_for,
            "bulk_jobs": args.bulk_jobs,
            "rounds": args.rounds,
            "samples": args.samples,
            "gap_s": args.gap,
            "database_url": mask_url(args.database_url),
            "ledger_schema": LEDGER_SCHEMA,
            "platform_worker_args": args.platform_worker_args,
            "platform_env": args.platform_env,
            "platform_bulk": args.platform_bulk,
            "settings": {p.name: p.settings for p in args.peers},
            "bulk": {p.name: p.bulk for p in args.peers},
            "worker_commands": {p.name: p.commands(p, ctx, "NODE") for p in args.peers},
        },
        "summary": summary,
        "vs_celery": versus,
        "runs": [{**r.__dict__, "ok": r.ok} for r in runs],
        "ok": all(r.ok for r in runs),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    print(f"results: {out} and {out.with_suffix('.md')}; worker logs in {logs}")
    failed = [r for r in runs if not r.ok]
    for r in failed:
        print(f"FAILED: {r.peer} round {r.round}: {'; '.join(r.errors)}", file=sys.stderr)
    return 1 if failed else 0


def print_run(run: Run) -> None:
    row = per_round(run)
    parts = [
        f"{label} {cell({'median': row[key], 'min': None, 'max': None}, spec)}"
        for label, key, spec in COLUMNS
        if row.get(key) is not None
    ]
    status = "ok" if run.ok else "FAILED: " + "; ".join(run.errors)
    print(
        f"  round {run.round} {run.peer:<12} load {run.load_1m:.2f} | "
        + " | ".join(parts)
        + f" | {status}"
    )
    if run.bulk_note:
        print(f"      bulk: {run.bulk_note}")
    for line in run.log_problems:
        print(f"      log: {line}")
