"""The peers benchmark (``bench/peers/``) still runs end to end: a ``--quick`` run of plain
Celery, the platform, Huey and the two floors of claiming before running (``celery-roundtrip``,
``celery-overlap``) on the benchmark's own Redis and the test Postgres writes every column with
sane values. Counts, not speed: no figure is compared with a target."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("celery", "platform", "huey", "celery-roundtrip", "celery-overlap")
JOBS = 150
SAMPLES = 8


def _bench(
    *argv: str, timeout: float = 540, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.peers", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _roundtrip_writes() -> tuple[int, int]:
    """Rows written so far by peer celery-roundtrip's pool processes (``bench.raw_app``: keyed
    by pid) and by peer celery-overlap's main process (``bench.overlap_app``: negative keys)."""
    import psycopg

    from bench.raw_app import ROUNDTRIP_TABLE

    with psycopg.connect(os.environ["DATABASE_URL"], autocommit=True) as conn:
        if conn.execute("SELECT to_regclass(%s)", (ROUNDTRIP_TABLE,)).fetchone() == (None,):
            return 0, 0
        row = conn.execute(
            "SELECT coalesce(sum(n) FILTER (WHERE pid > 0), 0), "
            f"coalesce(sum(n) FILTER (WHERE pid < 0), 0) FROM {ROUNDTRIP_TABLE}"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


@pytest.mark.timeout(600)
def test_quick_run_writes_every_column(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    writes = _roundtrip_writes()
    done = _bench(
        "--quick",
        "--only",
        ",".join(PEERS),
        "--jobs",
        str(JOBS),
        "--samples",
        str(SAMPLES),
        "--database-url",
        os.environ["DATABASE_URL"],
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())

    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"]
    assert machine["redis_server"] and len(machine["loadavg_start"]) == 3
    commit_ms = machine["postgres_commit_ms_start_end"]
    assert len(commit_ms) == 2 and all(ms > 0 for ms in commit_ms)
    for pkg in ("celery", "synth-workers", "huey", "dramatiq", "rq", "arq"):
        assert machine["versions"][pkg] != "not installed", pkg
    assert result["date"] and result["ok"] is True
    assert set(result["config"]["settings"]) == set(PEERS)

    runs = {run["peer"]: run for run in result["runs"]}
    assert set(runs) == set(PEERS) and len(result["runs"]) == len(PEERS)
    for name, run in runs.items():
        assert run["ok"] and not run["errors"], (name, run["errors"], run["log_problems"])
        assert run["jobs"] == JOBS
        assert run["enqueued"] == JOBS, name  # every enqueue landed
        assert run["drained"] == JOBS, name  # and every job left the backlog
        assert run["enqueue_per_s"] > 0 and run["drain_per_s"] > 0, name
        assert run["first_take_s"] > 0 and run["drain_s"] > 0, name
        assert len(run["latency_s"]) == SAMPLES, name
        assert all(0 < x < 30 for x in run["latency_s"]), (name, run["latency_s"])
        p = result["summary"][name]
        p50, p95, p99 = (p[f"latency_p{q}_ms"]["median"] for q in (50, 95, 99))
        assert 0 < p50 <= p95 <= p99, (name, p50, p95, p99)
    # the peers that keep a record of what ran agree with the count
    assert runs["celery"]["executed"] == JOBS
    assert runs["platform"]["executed"] == JOBS
    assert runs["celery-roundtrip"]["executed"] == JOBS
    assert runs["celery-overlap"]["executed"] == JOBS
    # and each of their jobs and probes (the samples and the one that warms up) wrote its row
    # to Postgres before its body: celery-roundtrip's in the pool process, celery-overlap's in
    # the main process, its answer relayed (a body that got no answer fails its run)
    pool_writes, main_writes = _roundtrip_writes()
    assert pool_writes - writes[0] == JOBS + SAMPLES + 1
    assert main_writes - writes[1] == JOBS + SAMPLES + 1
    assert not runs["celery-overlap"]["log_problems"]  # no body timed out on its relay
    # enqueue -> wait() is the platform's alone
    assert len(runs["platform"]["wait_s"]) == SAMPLES
    assert all(w > 0 for w in runs["platform"]["wait_s"])
    assert all(runs[name]["wait_s"] == [] for name in PEERS if name != "platform")
    # bulk: a figure where the peer has a bulk enqueue, else a note saying why not
    for name, run in runs.items():
        if run["bulk_per_s"] is None:
            assert run["bulk_note"], name
        else:
            assert run["bulk_per_s"] > 0 and run["bulk_jobs"] == JOBS, name

    table = out.with_suffix(".md").read_text()
    header = table.splitlines()[0]
    for column in ("single enqueue", "bulk enqueue", "drain", "p50", "p95", "p99", "wait()"):
        assert column in header
    for name in PEERS:
        assert f"| {name} | {JOBS} |" in table


def test_missing_postgres_is_named(tmp_path: Path) -> None:
    done = _bench(
        "--quick",
        "--only",
        "platform",
        "--database-url",
        "postgresql://postgres@127.0.0.1:1/nothing",
        "--out",
        str(tmp_path / "peers.json"),
        timeout=120,
    )
    assert done.returncode == 2
    assert "Postgres is not reachable" in done.stderr and "--database-url" in done.stderr
    assert not (tmp_path / "peers.json").exists()


def test_unknown_peer_is_refused() -> None:
    done = _bench("--only", "celery,sidekiq", timeout=60)
    assert done.returncode == 2
    assert "sidekiq" in done.stderr and "dramatiq-2p" in done.stderr


def test_missing_redis_server_is_named(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # no redis-server on it
    done = _bench("--quick", "--only", "huey", "--out", str(tmp_path / "p.json"), env=env)
    assert done.returncode == 2
    assert "redis-server is not installed" in done.stderr and "apt-get" in done.stderr


def test_bad_platform_variant_is_refused() -> None:
    done = _bench("--platform-variant", "batched", timeout=60)
    assert done.returncode == 2
    assert "--platform-variant takes LABEL:NAME=VALUE" in done.stderr
    done = _bench(
        "--platform-variant", "b:SYNTH_X=1", "--platform-variant", "b:SYNTH_Y=2", timeout=60
    )
    assert done.returncode == 2 and "given twice" in done.stderr
