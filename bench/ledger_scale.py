"""How many claims and completions per second one Postgres ledger sustains, and what it weighs.

N worker processes (N = 1, 2, 4, 8, 16 by default), each with its own ``Ledger`` (its own
pool, fast commits as in a worker: ``use_fast_commits``), run the ledger's real statements on
jobs of their own (as Redis would hand each worker different messages):

* ``combined``: the worker's hot path when jobs come back to back: one round trip per job,
  ``Ledger.claim(next, complete=[(previous, result)])`` (the fenced completion of the
  previous job rides along with the next claim);
* ``separate``: a sparse stream: ``Ledger.claim(job)`` then ``Ledger.succeed_many([...])``,
  two round trips per job;
* ``raw_update``: the peer, the floor of the same round trip: one plain single-row
  ``UPDATE synth_jobs SET updated_at = now() WHERE id = ...`` per job, same pool, same commit
  mode. ``combined / raw_update`` is what the ledger's statement and code cost over a bare
  round trip, read in the same run on the same machine.

Per level it also records the server's WAL bytes and the database's commits per job (use a
Postgres server of the bench's own for those: another database's writes count too).

The ledger is filled once with queued rows written by the real ``Ledger.insert_job`` (a
Celery message of the usual shape, ~0.9 KB), so claims walk a table of realistic rows and
indexes; before each level every row is set back to queued and the table vacuumed. Then
the sizes of ``synth_jobs`` (heap, TOAST, each index) are read for ``--size-rows`` jobs as
enqueued and after their claim and completion, and scaled to a million jobs.

Run from the repository root (Postgres running; the schema ``synth_scale`` is dropped and
made again)::

    .venv/bin/python -m bench.ledger_scale --database-url postgresql://postgres@127.0.0.1:5432/test
    .venv/bin/python -m bench.ledger_scale --levels 1,4 --seconds 3 --rounds 1   # quick

With ``--redis-url`` (a database of its own: its event keys are deleted) it also measures the
Redis memory of the job events the real ``EventWriter`` writes. Writes
``bench/results/ledger_scale.json``; prints one line per level and mode. The load
average before and after each level is recorded: on a shared machine, read it with them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

SCHEMA = "synth_scale"
OUT = Path(__file__).resolve().parent / "results" / "ledger_scale.json"


def _message(job_id: str, task: str) -> dict[str, Any]:
    """A Celery protocol-2 message as the producer stores it (headers, body, properties)."""
    return {
        "headers": {
            "lang": "py", "task": task, "id": job_id, "shadow": None, "eta": None,
            "expires": None, "group": None, "group_index": None, "retries": 0,
            "timelimit": [None, None], "root_id": job_id, "parent_id": None,
            "argsrepr": "()", "kwargsrepr": "{'to': 'user@example.com', 'template': 'welcome'}",
            "origin": f"gen{os.getpid()}@app-7d9f8c6b5-x2k4q", "ignore_result": False,
            "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
            "correlation_id": str(uuid.uuid4()),
        },
        "body": [[], {"to": "user@example.com", "template": "welcome", "vars": {"n": 1}},
                 {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
        "properties": {
            "correlation_id": job_id, "reply_to": str(uuid.uuid4()), "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": "email"}, "priority": 5,
            "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
        },
        "content-type": "application/json", "content-encoding": "utf-8",
    }  # fmt: skip


def _ledger(database_url: str) -> Any:
    from synth_workers.ledger.store import Ledger
    from synth_workers.settings import Settings

    return Ledger(
        Settings(database_url=database_url, db_schema=SCHEMA, db_pool_size=2, lease_seconds=300)
    )


def fill(database_url: str, count: int) -> list[str]:
    """Insert ``count`` queued jobs with the real insert; return their ids."""
    ledger = _ledger(database_url)
    ids = [str(uuid.uuid4()) for _ in range(count)]
    task = "tasks.email.send"
    try:
        with ledger.connection() as conn:
            for start in range(0, count, 1000):
                with conn.transaction():
                    for job_id in ids[start : start + 1000]:
                        ledger.insert_job(
                            conn,
                            job_id=job_id,
                            task=task,
                            queue="email",
                            priority=5,
                            payload={"to": "user@example.com", "template": "welcome"},
                            delay=None,
                            idempotency_key=None,
                            max_attempts=None,
                            published=True,
                            message=_message(job_id, task),
                        )
    finally:
        ledger.close()
    return ids


def _worker(args: tuple[str, str, list[str], float, Any, Any]) -> None:
    database_url, mode, ids, seconds, start, results = args
    ledger = _ledger(database_url)
    ledger.use_fast_commits()  # as a worker process does
    owner = f"bench-{os.getpid()}"
    done = refused = 0
    pending: list[Any] = []
    ledger.now()  # open the pool before the clock starts
    start.wait()
    began = time.perf_counter()
    deadline = began + seconds
    for job_id in ids:
        if time.perf_counter() >= deadline:
            break
        if mode == "raw_update":  # the floor: one plain single-row UPDATE per job
            with ledger.connection() as conn:
                conn.execute("UPDATE synth_jobs SET updated_at = now() WHERE id = %s", (job_id,))
            done += 1
            continue
        if mode == "combined":
            claim = ledger.claim(job_id, owner, complete=pending)
            done += len(pending)
            pending = [(claim, None)] if claim is not None else []
        else:
            claim = ledger.claim(job_id, owner)
            if claim is not None:
                done += len(ledger.succeed_many([(claim, None)]))
        if claim is None:
            refused += 1
    if pending:
        done += len(ledger.succeed_many(pending))
    elapsed = time.perf_counter() - began
    ledger.close()
    results.put({"done": done, "refused": refused, "elapsed": elapsed})


def requeue(database_url: str) -> None:
    """Every row back to queued, as enqueued (between levels: one fill serves them all)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"SET search_path = {SCHEMA}")
        conn.execute(
            "UPDATE synth_jobs SET state = 'queued', attempt = 0, lease_owner = NULL, "
            "lease_expires_at = NULL, started_at = NULL, finished_at = NULL, result = NULL "
            "WHERE state <> 'queued'"
        )
        conn.execute("TRUNCATE synth_late_completions")
        conn.execute("VACUUM ANALYZE synth_jobs")


def run_level(
    database_url: str, mode: str, procs: int, seconds: float, per_proc: int, all_ids: list[str]
) -> dict:
    requeue(database_url)
    ids = all_ids[: procs * per_proc]
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    results = ctx.Queue()
    load_before = os.getloadavg()
    workers = [
        ctx.Process(target=_worker, args=((database_url, mode,
                                           ids[i * per_proc : (i + 1) * per_proc],
                                           seconds, start, results),))
        for i in range(procs)
    ]  # fmt: skip
    for w in workers:
        w.start()
    time.sleep(1.0 + 0.15 * procs)  # every process has opened its pool (imports included)
    wal_before, xacts_before = _counters(database_url)
    start.set()
    got = [results.get(timeout=seconds + 120) for _ in workers]
    wal_after, xacts_after = _counters(database_url)
    for w in workers:
        w.join(30)
    done = sum(r["done"] for r in got)
    wall = max(r["elapsed"] for r in got)
    exhausted = done >= len(ids)
    return {
        "mode": mode,
        "processes": procs,
        "jobs_done": done,
        "refused": sum(r["refused"] for r in got),
        "seconds": round(wall, 3),
        "jobs_per_second": round(done / wall, 1),
        "ran_out_of_jobs": exhausted,
        # the whole server's WAL and this database's commits while the level ran (another
        # database's writes on the same server count too: use a server of the bench's own)
        "wal_bytes_per_job": round((wal_after - wal_before) / max(done, 1)),
        "commits_per_job": round((xacts_after - xacts_before) / max(done, 1), 2),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def _counters(database_url: str) -> tuple[int, int]:
    """The server's WAL position (bytes) and this database's commits so far."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint, xact_commit "
            "FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def sizes(database_url: str) -> dict[str, Any]:
    """synth_jobs's sizes now (heap, TOAST, each index), per row and per million rows."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"SET search_path = {SCHEMA}")
        conn.execute("VACUUM ANALYZE synth_jobs")
        rows = conn.execute("SELECT count(*) FROM synth_jobs").fetchone()[0]
        states = dict(conn.execute("SELECT state, count(*) FROM synth_jobs GROUP BY 1").fetchall())
        heap, toast, total = conn.execute(
            "SELECT pg_relation_size('synth_jobs'), "
            "coalesce(pg_total_relation_size(reltoastrelid), 0), "
            "pg_total_relation_size('synth_jobs') FROM pg_class WHERE oid = 'synth_jobs'::regclass"
        ).fetchone()
        indexes = conn.execute(
            "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) "
            "FROM pg_index WHERE indrelid = 'synth_jobs'::regclass ORDER BY 2 DESC"
        ).fetchall()
        avg_message = conn.execute("SELECT avg(pg_column_size(t.*)) FROM synth_jobs t").fetchone()[
            0
        ]
    per_million = 1_000_000 / max(rows, 1)

    def mib(n: float) -> float:
        return round(n * per_million / 2**20, 1)

    return {
        "rows": rows,
        "states": states,
        "avg_row_bytes": round(float(avg_message or 0)),
        "per_million_jobs_mib": {
            "heap": mib(heap),
            "toast": mib(toast),
            "indexes": {name: mib(size) for name, size in indexes},
            "indexes_total": mib(sum(size for _, size in indexes)),
            "total": mib(total),
        },
    }


def event_memory(redis_url: str, jobs: int) -> dict[str, Any]:
    """Redis memory the events of ``jobs`` jobs take (enqueued, started, succeeded, written by
    the real ``EventWriter``): per job while their streams live, and the global stream's
    share. The Redis database must be the bench's own: its event keys are deleted."""
    import redis

    from synth_workers.events.stream import GLOBAL_STREAM, PREFIX, EventWriter
    from synth_workers.lifecycle import JobEvent

    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{PREFIX}*"):
        client.delete(key)
    writer = EventWriter(client, retention=3600, maxlen=10 * jobs, job_ttl=7 * 24 * 3600)
    before = int(client.info("memory")["used_memory"])
    for _ in range(jobs):
        job_id = str(uuid.uuid4())
        about = {"task": "tasks.email.send", "queue": "email", "user_id": "user-42",
                 "correlation_id": str(uuid.uuid4())}  # fmt: skip
        writer.write([
            JobEvent("enqueued", job_id, **about, data={"priority": 5}),
            JobEvent("started", job_id, attempt=1, **about, data={"queue_wait": 0.012}),
            JobEvent("succeeded", job_id, attempt=1, **about, data={"runtime": 0.2}),
        ])  # fmt: skip
    after = int(client.info("memory")["used_memory"])
    global_bytes = int(client.memory_usage(GLOBAL_STREAM) or 0)
    for key in client.scan_iter(f"{PREFIX}*"):
        client.delete(key)
    return {
        "jobs": jobs,
        "bytes_per_job_all_streams": round((after - before) / jobs),
        "bytes_per_job_global_stream": round(global_bytes / jobs),
    }


def reset(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    ledger = _ledger(database_url)
    ledger.migrate()
    ledger.close()


def truncate(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {SCHEMA}.synth_jobs, {SCHEMA}.synth_late_completions")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--levels", default="1,2,4,8,16", help="process counts")
    parser.add_argument("--modes", default="raw_update,combined,separate")
    parser.add_argument("--seconds", type=float, default=5.0, help="per level and mode")
    parser.add_argument("--jobs-per-process", type=int, default=6000, help="rows per process")
    parser.add_argument("--rounds", type=int, default=3, help="medians over this many")
    parser.add_argument(
        "--size-rows", type=int, default=50_000, help="rows for the sizes (0: no sizes)"
    )
    parser.add_argument(
        "--redis-url", default=None, help="a Redis database of the bench's own: event memory"
    )
    parser.add_argument("--event-jobs", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=OUT)
    opts = parser.parse_args()
    reset(opts.database_url)
    with psycopg.connect(opts.database_url, autocommit=True) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]
        settings = dict(conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('shared_buffers', "
            "'max_connections', 'synchronous_commit', 'wal_level', 'fsync')"
        ).fetchall())  # fmt: skip
    report: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "postgres": server, "postgres_settings": settings},
        "levels": [],
    }
    levels = [int(n) for n in opts.levels.split(",")]
    modes = opts.modes.split(",")
    all_ids = fill(opts.database_url, max(levels) * opts.jobs_per_process)
    for round_no in range(opts.rounds):
        for procs in levels:
            shift = (round_no + procs) % len(modes)  # each mode runs first in turn
            for mode in modes[shift:] + modes[:shift]:
                level = run_level(
                    opts.database_url, mode, procs, opts.seconds, opts.jobs_per_process, all_ids
                )
                level["round"] = round_no
                report["levels"].append(level)
                print(_line(level), flush=True)
    report["medians"] = medians(report["levels"], modes, levels)
    for row in report["medians"]:
        print(json.dumps(row))
    if opts.size_rows <= 0:
        _write(opts.out, report)
        return
    # sizes: SIZE_ROWS jobs as enqueued, then after each went through a claim and a
    # completion (plain VACUUM, as autovacuum would: freed space is reused, not returned)
    truncate(opts.database_url)
    fill(opts.database_url, opts.size_rows)
    report["sizes_queued"] = sizes(opts.database_url)
    with psycopg.connect(opts.database_url, autocommit=True) as conn:
        conn.execute(f"SET search_path = {SCHEMA}")
        conn.execute(
            "UPDATE synth_jobs SET state = 'running', attempt = 1, lease_owner = 'w', "
            "lease_expires_at = now(), started_at = now(), updated_at = now()"
        )
        conn.execute(
            "UPDATE synth_jobs SET state = 'succeeded', result = '\"ok\"'::jsonb, "
            "finished_at = now(), lease_owner = NULL, lease_expires_at = NULL, updated_at = now()"
        )
    report["sizes_succeeded"] = sizes(opts.database_url)
    print(json.dumps({k: report[k] for k in ("sizes_queued", "sizes_succeeded")}, indent=2))
    if opts.redis_url:
        report["events"] = event_memory(opts.redis_url, opts.event_jobs)
        print(json.dumps(report["events"]))
    _write(opts.out, report)


def _line(level: dict[str, Any]) -> str:
    return (
        f"r{level['round']} {level['mode']:10} N={level['processes']:<3} "
        f"{level['jobs_per_second']:>8.1f} jobs/s ({level['jobs_done']} in {level['seconds']} s, "
        f"WAL {level['wal_bytes_per_job']} B/job, {level['commits_per_job']} commits/job, "
        f"load {level['loadavg_before'][0]}->{level['loadavg_after'][0]})"
        + ("  RAN OUT OF JOBS: raise --jobs-per-process" if level["ran_out_of_jobs"] else "")
    )


def _write(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {out}")


def medians(runs: list[dict[str, Any]], modes: list[str], levels: list[int]) -> list[dict]:
    """Per process count: each mode's median jobs/s and WAL bytes per job over the rounds,
    and each ledger mode's ratio to the raw round trip (the peer) of the same rounds."""
    out = []
    for procs in levels:
        row: dict[str, Any] = {"processes": procs}
        for mode in modes:
            mine = [r for r in runs if r["mode"] == mode and r["processes"] == procs]
            row[mode] = statistics.median(r["jobs_per_second"] for r in mine) if mine else None
            row[f"{mode}_wal_bytes_per_job"] = (
                statistics.median(r["wal_bytes_per_job"] for r in mine) if mine else None
            )
        raw = row.get("raw_update")
        for mode in modes:
            if mode != "raw_update" and raw and row.get(mode):
                row[f"{mode}_vs_raw_update"] = round(row[mode] / raw, 2)
        out.append(row)
    return out


if __name__ == "__main__":
    main()
