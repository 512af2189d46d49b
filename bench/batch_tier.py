"""The batch tier: N deferrable embedding jobs through the loopback batch server, against
the same N jobs online, in the same run.

Per mode, with everything else the same:

1. clean the ledger (schema ``synth_bench_batch``) and the queue; start the loopback server
   (``tests.fake_batches``: the OpenAI files and batches endpoints, and the online
   embeddings endpoint);
2. start one worker, ``celery -A synth_workers worker -Q embeddings -P threads -c C``, with
   ``SYNTH_EMBED_PROVIDER=openai`` pointed at the server and Qdrant in memory;
3. enqueue N ``tasks.embeddings.index_documents`` jobs of one short document each —
   ``deferrable=True`` in mode ``batch``, not in mode ``online`` (micro-batching off there:
   one request per job, the baseline the batch API replaces) — and wait until the ledger holds
   N succeeded jobs;
4. count what the provider saw: batch-API calls (file uploads, batch creations, status
   polls, result downloads) and online embedding requests, and the credits: the batch mode's
   recorded in each job's result (``SYNTH_LLM_PRICES`` × ``SYNTH_BATCH_PRICE_FACTOR``), the
   online mode's from the same price and the tokens the provider reported.

Run from the repository root against a Redis and a Postgres (``--redis-url`` /
``--database-url``, else ``$REDIS_URL`` / ``$DATABASE_URL``)::

    .venv/bin/python -m bench.batch_tier                 # 1000 jobs
    .venv/bin/python -m bench.batch_tier --jobs 100      # quick check

Exits non-zero when a job is lost or fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SCHEMA = "synth_bench_batch"
TASK = "tasks.embeddings.index_documents"


def _worker(env: dict[str, str], args: argparse.Namespace, log: Path) -> subprocess.Popen[bytes]:
    node = f"bench-batch-{os.getpid()}@{socket.gethostname()}"
    argv = [
        sys.executable, "-m", "celery", "-A", "synth_workers", "worker", "-Q", "embeddings",
        "-n", node, "-P", "threads", "-c", str(args.concurrency),
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


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    from synth_workers import app, enqueue
    from synth_workers.providers.llm import credits
    from tests.fake_batches import FakeBatchProviders
    from tests.fake_providers import EMBEDDINGS

    with app.ledger.connection() as conn:
        conn.execute("TRUNCATE synth_jobs, synth_idempotency, synth_batch_items, synth_batches")
    app.redis.flushdb()
    server = FakeBatchProviders()
    server.batch_seconds = args.batch_seconds
    env = {
        **os.environ,
        "OPENAI_API_KEY": "sk-bench",
        "SYNTH_EMBED_PROVIDER": "openai",
        "SYNTH_EMBED_MODEL": args.model,
        "SYNTH_EMBED_BASE_URL": f"{server.url}/v1",
        "SYNTH_EMBED_BATCHING": "false",
        "SYNTH_BATCH_MAX_ITEMS": str(args.batch_max_items),
        "SYNTH_BATCH_MAX_AGE": str(args.batch_max_age),
        "SYNTH_BATCH_POLL_INTERVAL": str(args.poll_interval),
        "SYNTH_BATCH_TICK": "0.2",
        "PYTHONUNBUFFERED": "1",
    }
    log = Path(args.logs) / f"worker-{mode}.log"
    proc = _worker(env, args, log)
    try:
        started = time.monotonic()
        ids = [
            enqueue(
                TASK,
                {"documents": [{"id": f"doc-{i}", "text": f"document number {i} of the bench"}]},
                deferrable=mode == "batch",
            ).id
            for i in range(args.jobs)
        ]
        enqueued = time.monotonic() - started
        deadline = time.monotonic() + args.timeout
        done = 0
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited: {log.read_text()[-2000:]}")
            with app.ledger.connection() as conn:
                row = conn.execute(
                    "SELECT count(*) FILTER (WHERE state = 'succeeded'), "
                    "count(*) FILTER (WHERE state IN ('dead', 'cancelled')) FROM synth_jobs "
                    "WHERE id = ANY(%s::uuid[])",
                    (ids,),
                ).fetchone()
            assert row is not None
            done, failed = int(row[0]), int(row[1])
            if failed:
                raise RuntimeError(f"{failed} jobs failed")
            if done == len(ids):
                break
            time.sleep(0.25)
        elapsed = time.monotonic() - started
        if done != len(ids):
            raise RuntimeError(f"only {done} of {len(ids)} jobs succeeded in {args.timeout}s")
        with app.ledger.connection() as conn:
            results = [r[0] for r in conn.execute(
                "SELECT result FROM synth_jobs WHERE id = ANY(%s::uuid[])", (ids,)
            ).fetchall()]  # fmt: skip
        online = server.requests(EMBEDDINGS)
        calls: dict[str, int] = {}
        for r in server.batch_calls():
            kind = r.path.split("/")[2] + (" content" if r.path.endswith("/content") else "")
            calls[kind] = calls.get(kind, 0) + 1
        if mode == "batch":
            cost = sum(float(r["credits"]) for r in results)
            tokens = sum(int(r["input_tokens"]) for r in results)
        else:
            tokens = sum(len(r.body["input"]) for r in online)  # the fake's usage: 1 per text
            cost = credits(app.settings, "openai", args.model, tokens, 0)
        batches = server.provider_batches("openai")
        return {
            "mode": mode,
            "jobs": len(ids),
            "enqueue_s": round(enqueued, 2),
            "all_done_s": round(elapsed, 2),
            "online_requests": len(online),
            "batch_api_calls": sum(calls.values()),
            "batch_api_calls_by_endpoint": calls,
            "batches": len(batches),
            "batch_sizes": sorted(len(b["items"]) for b in batches),
            "provider_calls": len(online) + sum(calls.values()),
            "tokens": tokens,
            "credits": round(cost, 6),
        }
    finally:
        _stop(proc)
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--batch-max-items", type=int, default=250)
    parser.add_argument("--batch-max-age", type=float, default=2.0)
    parser.add_argument("--batch-seconds", type=float, default=1.0)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--model", default="text-embedding-3-small")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--logs", default=tempfile.gettempdir())
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args(argv)
    if not args.redis_url or not args.database_url:
        parser.error("give --redis-url and --database-url (or REDIS_URL and DATABASE_URL)")
    os.environ.update(
        REDIS_URL=args.redis_url,
        DATABASE_URL=args.database_url,
        SYNTH_DB_SCHEMA=SCHEMA,
        SYNTH_METRICS_PORT="0",
    )
    sys.path.insert(0, str(REPO))
    from synth_workers import app

    app.ledger.migrate()
    runs = [run_mode(mode, args) for mode in ("batch", "online")]
    batch, online = runs
    summary = {
        "runs": runs,
        "provider_calls_ratio": round(online["provider_calls"] / batch["provider_calls"], 1),
        "cost_ratio": round(batch["credits"] / online["credits"], 3) if online["credits"] else None,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    for r in runs:
        print(
            f"{r['mode']:>6}: {r['jobs']} jobs in {r['all_done_s']} s; provider calls "
            f"{r['provider_calls']} (online {r['online_requests']}, batch API "
            f"{r['batch_api_calls']} {r['batch_api_calls_by_endpoint']}, batches "
            f"{r['batch_sizes']}); tokens {r['tokens']}, credits {r['credits']}"
        )
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
