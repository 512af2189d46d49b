"""SSE fan-out: C concurrent clients on one ``synth-workers events serve`` process, every
client must receive every event meant for it, in order, none twice.

Two phases, against one server process (started here on 127.0.0.1, a free port):

1. **user**: C clients follow the same user's stream (``GET /events?user=fan``); J jobs of
   that user emit ``queued, started, progress x P, succeeded`` each, written through the
   platform's event writer one event per round trip (as a worker does) at ``--rate``
   events/s. Each client must receive all ``J * (P + 3)`` events.
2. **job**: C clients, each following its own job as its own user (``GET /events?job=ID``);
   the C jobs' events are written interleaved at ``--rate``; each stream ends after the
   job's ``succeeded`` event and must hold all ``P + 3`` events.

Reported: time for all clients to connect, events delivered, delivery latency (client
receive time minus the event's ``at``: p50, p95, p99, max), and losses/duplicates/disorder
(must be 0; otherwise exit 1).

Run from the repository root (Redis running; a Redis database of your own)::

    .venv/bin/python -m bench.sse_fanout --clients 200 --redis-url redis://127.0.0.1:6379/10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SECRET = "bench-secret-for-the-sse-fanout-benchmark-0123456789"  # noqa: S105 - a bench key


def start_server(
    redis_url: str, database_url: str, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "DATABASE_URL": database_url,
        "SYNTH_DB_SCHEMA": "synth_bench",
        "JWT_SECRET": SECRET,
        "SYNTH_EVENTS_HEARTBEAT": "5",
    }
    with log.open("wb") as out:  # a file, not a pipe: a full pipe would stall the server
        proc = subprocess.Popen(
            [sys.executable, "-m", "synth_workers.cli", "events", "serve", "--port", "0"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        match = re.search(r"listening on (http://\S+)", log.read_text(errors="replace"))
        if match:
            return proc, match.group(1)
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"the server did not start: {log.read_text(errors='replace')}")


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -9


class Client:
    """One SSE client: records (id, kind, job, at, received) per event."""

    def __init__(self, url: str, params: dict[str, str], user: str, until: int) -> None:
        from synth_workers.events.auth import issue_token

        self.url = url
        self.params = params
        self.headers = {"Authorization": f"Bearer {issue_token(SECRET, user)}"}
        self.until = until  # stop after this many events
        self.events: list[tuple[str, str, str, float, float]] = []
        self.connected = asyncio.Event()
        self.status: int | None = None

    async def run(self, http: Any) -> None:
        async with http.stream("GET", self.url, params=self.params, headers=self.headers) as r:
            self.status = r.status_code
            self.connected.set()
            if r.status_code != 200:
                return
            event_id = ""
            async for line in r.aiter_lines():
                if line.startswith("id: "):
                    event_id = line[4:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    self.events.append(
                        (event_id, data["kind"], data["job_id"], data["at"], time.time())
                    )
                    if len(self.events) >= self.until:
                        return


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def job_events(job: str, user: str, steps: int) -> list[Any]:
    from synth_workers.lifecycle import JobEvent

    about = {"task": "bench.sse", "queue": "default", "user_id": user}
    out = [JobEvent("queued", job, **about, data={"priority": 5})]
    out.append(JobEvent("started", job, attempt=1, **about, data={"queue_wait": 0.0}))
    for i in range(1, steps + 1):
        out.append(
            JobEvent("progress", job, attempt=1, **about, data={"current": i, "total": steps})
        )
    out.append(JobEvent("succeeded", job, attempt=1, **about, data={"runtime": 0.1}))
    return out


async def publish(writer: Any, events: list[Any], rate: float) -> tuple[list[str], float]:
    """Write events one per round trip (from a thread) at ``rate``/s; return their ids."""
    ids: list[str] = []

    def write_all() -> float:
        t0 = time.perf_counter()
        for n, event in enumerate(events):
            ahead = t0 + n / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
            ids.extend(writer.write([_stamped(event)]))
        return time.perf_counter() - t0

    took = await asyncio.to_thread(write_all)
    return ids, took


def _stamped(event: Any) -> Any:
    """The event with ``at`` = now (latency is measured from the write)."""
    from dataclasses import replace

    return replace(event, at=time.time())


async def phase(
    name: str,
    base: str,
    clients: list[Client],
    writer: Any,
    events: list[Any],
    rate: float,
    expect: Callable[[list[str]], list[list[str]]] | None = None,
) -> dict[str, Any]:
    """Connect every client, then write ``events``; ``expect(ids written)`` gives each
    client's expected ids (default: all of them)."""
    import httpx

    limits = httpx.Limits(max_connections=len(clients) + 10)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0), limits=limits) as http:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(c.run(http)) for c in clients]
        await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in clients)), 60)
        # the server has registered every reader once /health counts them
        while True:
            health = (await http.get(f"{base}/health")).json()
            if health["connections"] >= len(clients):
                break
            await asyncio.sleep(0.05)
        connect_s = time.perf_counter() - t0
        ids, publish_s = await publish(writer, events, rate)
        t1 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        done_s = time.perf_counter() - t1
    bad_status = [c.status for c in clients if c.status != 200]
    written = set(ids)  # latency of the events written in this phase (not earlier ones)
    latencies = [recv - at for c in clients for (i, _k, _j, at, recv) in c.events if i in written]
    problems = 0
    wanted = expect(ids) if expect is not None else [ids] * len(clients)
    for n, c in enumerate(clients):
        want = wanted[n]
        got = [e[0] for e in c.events]
        if got != want:
            problems += 1
    delivered = sum(len(c.events) for c in clients)
    result = {
        "phase": name,
        "clients": len(clients),
        "events_written": len(events),
        "events_delivered": delivered,
        "clients_with_missing_duplicate_or_disordered_events": problems,
        "bad_status": bad_status,
        "connect_all_s": round(connect_s, 3),
        "publish_s": round(publish_s, 3),
        "drain_after_publish_s": round(done_s, 3),
        "delivered_per_s": round(delivered / (publish_s + done_s), 1),
        "latency_ms": {
            "p50": round(statistics.median(latencies) * 1000, 2) if latencies else None,
            "p95": round(percentile(latencies, 95) * 1000, 2) if latencies else None,
            "p99": round(percentile(latencies, 99) * 1000, 2) if latencies else None,
            "max": round(max(latencies) * 1000, 2) if latencies else None,
        },
    }
    print(
        f"  {name}: {len(clients)} clients connected in {connect_s:.2f}s; {len(events)} "
        f"events written in {publish_s:.2f}s, {delivered} delivered "
        f"({result['delivered_per_s']:.0f}/s); latency ms p50 {result['latency_ms']['p50']} "
        f"p95 {result['latency_ms']['p95']} p99 {result['latency_ms']['p99']} max "
        f"{result['latency_ms']['max']}; clients with a wrong sequence: {problems}"
        + (f"; bad status: {bad_status}" if bad_status else "")
    )
    return result


async def run(args: argparse.Namespace, base: str) -> list[dict[str, Any]]:
    from synth_workers.events import EventWriter, events_client

    writer = EventWriter(events_client(args.redis_url), retention=120, maxlen=100_000, job_ttl=3600)
    url = f"{base}/events"
    steps = args.steps
    per_job = steps + 3
    results = []

    # 1. every client follows one user's stream
    user = f"fan-{uuid.uuid4().hex[:6]}"
    events = [e for j in range(args.jobs) for e in job_events(str(uuid.uuid4()), user, steps)]
    clients = [Client(url, {"user": user}, user, len(events)) for _ in range(args.clients)]
    results.append(await phase("user", base, clients, writer, events, args.rate))

    # 2. each client follows its own job; the jobs' events interleave
    jobs = [(str(uuid.uuid4()), f"user-{n}-{uuid.uuid4().hex[:6]}") for n in range(args.clients)]
    per = [job_events(job, owner, steps) for job, owner in jobs]
    first_ids = [writer.write([job_list[0]])[0] for job_list in per]  # before the clients ask
    rest = [per[n][k] for k in range(1, per_job) for n in range(len(per))]
    clients = [Client(url, {"job": job, "since": "0"}, owner, per_job) for job, owner in jobs]

    def expect(ids: list[str]) -> list[list[str]]:  # rest is job-interleaved: stride C
        count = len(per)
        return [[first_ids[n], *ids[n::count]] for n in range(count)]

    result = await phase("job", base, clients, writer, rest, args.rate, expect=expect)
    results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sse_fanout")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--jobs", type=int, default=20, help="jobs in the user phase (20)")
    parser.add_argument("--steps", type=int, default=10, help="progress events per job (10)")
    parser.add_argument("--rate", type=float, default=500.0, help="events written per second")
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/14")
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "sse_fanout.json")
    args = parser.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    os.environ["REDIS_URL"] = args.redis_url
    os.environ["DATABASE_URL"] = args.database_url
    print(
        f"sse fan-out: {args.clients} clients on one server process, {args.steps} progress "
        f"events per job, writes at {args.rate:g}/s"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    server_log = args.out.parent / "sse_fanout_server.log"
    proc, base = start_server(args.redis_url, args.database_url, server_log)
    import psutil

    server = psutil.Process(proc.pid)
    server_cpu = None
    try:
        results = asyncio.run(run(args, base))
        cpu = server.cpu_times()
        server_cpu = cpu.user + cpu.system
        own = psutil.Process().cpu_times()
        print(
            f"  CPU seconds: server process {server_cpu:.2f}, this process (the {args.clients} "
            f"clients and the writer) {own.user + own.system:.2f}"
        )
    finally:
        code = stop_server(proc)
    ok = all(
        r["clients_with_missing_duplicate_or_disordered_events"] == 0 and not r["bad_status"]
        for r in results
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "sse_fanout",
                "config": vars(args) | {"out": str(args.out)},
                "phases": results,
                "server_cpu_s": server_cpu,
                "server_exit": code,
                "ok": ok,
            },
            indent=2,
        )
        + "\n"
    )
    print(
        f"{'ok' if ok else 'FAILED'}: every client got every event once, in order"
        if ok
        else "FAILED: some client missed, repeated or reordered events"
    )
    print(f"results: {args.out}")
    return 0 if ok and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
