"""`synth-workers status`, `check` and `metrics serve` against what a test enqueued."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from synth_workers import app, enqueue

from .conftest import ROOT, wait_until
from .test_ops_metrics import free_port, get

CLI = [sys.executable, "-m", "synth_workers.cli"]
QUEUE = "ops-status"
IDLE = "ops-idle"
RECORD = "tests.e2e_tasks.record"
#: priority -> how many jobs the test enqueues there (none run: no worker consumes QUEUE)
PLAN = {9: 1, 8: 3, 5: 2, 0: 1}


def _enqueue_plan() -> None:
    for level, count in PLAN.items():
        for i in range(count):
            enqueue(RECORD, {"label": f"p{level}-{i}"}, queue=QUEUE, priority=level)
    enqueue(RECORD, {"label": "later-1"}, queue=QUEUE, delay=300)
    enqueue(RECORD, {"label": "later-2"}, queue=QUEUE, delay=300, priority="high")
    # one dead job (in a queue of its own)
    handle = enqueue(RECORD, {"label": "dead"}, queue="ops-status-dead")
    claim = app.ledger.claim(handle.id, "test-owner")
    assert claim is not None
    assert app.ledger.dead(claim, "exception", "RuntimeError", "boom", "")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_json_matches_what_was_enqueued(rclient: Any, start_worker: Any) -> None:
    _enqueue_plan()
    start_worker(IDLE, env={"SYNTH_HEALTH_INTERVAL": "0.5"})

    def idle_worker_seen() -> bool:
        snap = json.loads(_run("status", "--json").stdout)
        oldest = {q["queue"]: q["oldest_age_seconds"] for q in snap["queues"]}.get(QUEUE)
        aged = oldest is not None and oldest >= 0.3
        return aged and any(IDLE in w["queues"] for w in snap["workers"])

    assert wait_until(idle_worker_seen, timeout=10)
    proc = _run("status", "--json")
    assert proc.returncode == 0, proc.stderr
    snap = json.loads(proc.stdout)
    queues = {q["queue"]: q for q in snap["queues"]}
    mine = queues[QUEUE]
    expected_depth = {str(level): PLAN.get(level, 0) for level in range(10)}
    assert mine["depth"] == expected_depth
    assert mine["waiting"] == sum(PLAN.values())
    assert mine["delayed"] == 2
    assert mine["oldest_age_seconds"] is not None and mine["oldest_age_seconds"] >= 0.3
    assert mine["workers"] == 0
    assert queues[IDLE]["workers"] == 1
    assert queues[IDLE]["waiting"] == 0
    # every platform queue is listed, empty or not
    assert {"email", "orchestration", "embeddings", "embeddings.gpu", "default"} <= set(queues)
    assert snap["dlq_size"] == 1
    assert snap["unfinished"]["queued"] == sum(PLAN.values())
    assert snap["unfinished"]["scheduled"] == 2
    assert snap["last_hour"]["dead"] == 1
    assert snap["last_hour"]["scheduled"] == 2

    human = _run("status")
    assert human.returncode == 0
    assert QUEUE in human.stdout and "dead-letter queue: 1 job(s)" in human.stdout


def test_status_watch_refreshes_until_interrupted(rclient: Any) -> None:
    proc = subprocess.Popen(
        [*CLI, "status", "--watch", "--interval", "0.2"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout

    def read() -> None:
        for line in stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert wait_until(lambda: sum("cluster status at" in line for line in lines) >= 2, timeout=20)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=20)
    reader.join(timeout=20)
    assert proc.returncode == 0
    assert "".join(lines).count("cluster status at") >= 2


def test_metrics_serve_exports_cluster_gauges(rclient: Any) -> None:
    _enqueue_plan()
    port = free_port()
    proc = subprocess.Popen(
        [*CLI, "metrics", "serve", "--address", "127.0.0.1", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def up() -> bool:
            try:
                return get(f"http://127.0.0.1:{port}/metrics", timeout=2)[0] == 200
            except OSError:
                return False

        assert wait_until(up, timeout=30)
        body = get(f"http://127.0.0.1:{port}/metrics")[1].decode()
        found = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body)
            for s in family.samples
        }
        for level in range(10):
            key = ("synth_queue_depth", (("priority", str(level)), ("queue", QUEUE)))
            assert found[key] == PLAN.get(level, 0), level
        assert found[("synth_queue_delayed", (("queue", QUEUE),))] == 2
        assert found[("synth_dlq_size", ())] == 1
        assert found[("synth_queue_oldest_job_age_seconds", (("queue", QUEUE),))] >= 0
        assert found[("synth_ledger_jobs", (("state", "scheduled"),))] == 2
        status, health = get(f"http://127.0.0.1:{port}/health")
        assert status == 200
        doc = json.loads(health)
        assert doc["status"] == "ok" and doc["checks"]["redis"]["status"] == "ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_check_exits_0_when_all_answer_and_1_otherwise() -> None:
    ok = _run("check", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["status"] == "ok"
    assert {"configuration", "redis", "postgres", "ledger", "qdrant"} <= set(doc["checks"])

    bad_pg = _run("check", "--json", env={"DATABASE_URL": "postgresql://x@127.0.0.1:1/none"})
    assert bad_pg.returncode == 1
    assert json.loads(bad_pg.stdout)["checks"]["postgres"]["status"] == "fail"

    bad_redis = _run("check", env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert bad_redis.returncode == 1
    assert "redis" in bad_redis.stderr and "fail" in bad_redis.stderr
    assert "Traceback" not in bad_redis.stderr

    bad_config = _run("check", env={"SYNTH_MAX_ATTEMPTS": "many"})
    assert bad_config.returncode == 1
    assert "SYNTH_MAX_ATTEMPTS" in bad_config.stderr


def test_status_names_an_unreachable_redis() -> None:
    proc = _run("status", env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert proc.returncode == 3
    assert "Redis is not reachable at redis://127.0.0.1:1/0 (REDIS_URL)" in proc.stderr
    assert "Traceback" not in proc.stderr
