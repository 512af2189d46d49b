"""The start-latency breakdown (``bench/latency_parts.py``) still runs end to end: both apps'
probes start, and every stage is stamped (the claim only on the platform). Stamps, not
speed: no figure is compared with a target."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = 6


def _bench(module: str, *argv: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m bench.MODULE ARGV...`` from the repository root."""
    return subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(300)
def test_a_short_run_stamps_every_stage(tmp_path: Path, redis_url: str, database_url: str) -> None:
    out = tmp_path / "latency.json"
    done = _bench(
        "latency_parts",
        "--samples",
        str(SAMPLES),
        "--rounds",
        "1",
        "--gap",
        "0.005",
        "--redis-url",
        redis_url,
        "--database-url",
        database_url,
        "--out",
        str(out),
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["probes"] == {"celery": SAMPLES, "platform": SAMPLES}
    for stage in ("send", "to the worker", "to the pool process", "to the body (rest)", "total"):
        assert report[stage]["celery"] is not None and report[stage]["platform"] is not None
        assert 0 < report[stage]["platform"] < 10_000, stage
    assert report["claim"]["celery"] is None  # plain Celery claims nothing
    assert 0 < report["claim"]["platform"] < report["total"]["platform"]
    for app in ("celery", "platform"):
        # not the send: it may return after the body started (the platform's waits for its
        # row's commit while the message travels); no other stage can end after the total
        assert report["to the worker"][app] < report["total"][app]


@pytest.mark.timeout(120)
def test_the_claim_round_trip_bench_claims_queued_rows(tmp_path: Path, database_url: str) -> None:
    """``bench/claim_rtt.py`` times the real claim statement, which must find and take a
    queued row each time (the warm-up, then the idle and back-to-back samples)."""
    out = tmp_path / "claim_rtt.json"
    samples = 8
    done = _bench(
        "claim_rtt",
        "--samples",
        str(samples),
        "--database-url",
        database_url,
        "--out",
        str(out),
        timeout=100,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["claimed"] == 1 + 2 * (samples - 3)
    assert set(report["statements"]) == {"select1", "floor-write", "claim"}
    for name, row in report["statements"].items():
        assert 0 < row["back_to_back_median_ms"] < 1_000, name
        assert 0 < row["idle_median_ms"] <= row["idle_p90_ms"] < 1_000, name
