"""No message can stop a worker: hostile and malformed messages pushed straight onto a
queue's Redis list, while a real prefork worker runs and good jobs flow, are dead-lettered
with their reason and counted; none runs, none is put back, the worker never exits."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from synth_workers import app, enqueue
from synth_workers.ledger.transport import priority_lists

from .conftest import wait_until
from .hostile_messages import SIDE_EFFECT, envelope, hostile_messages, queue_list, raw, zeros_bomb
from .test_ops_metrics import free_port, samples, value

QUEUE = "hostile-test"


def _refused() -> list[dict[str, Any]]:
    return app.ledger.list_jobs(
        states=("dead",), failure_class="rejected_message", limit=1000
    ) + app.ledger.list_jobs(states=("dead",), failure_class="invalid_payload", limit=1000)


def _waiting(rclient: Any) -> int:
    return sum(int(rclient.llen(key)) for key in priority_lists(QUEUE))


def test_every_hostile_message_is_dead_lettered_and_good_jobs_run(
    rclient: Any, start_worker: Any, tmp_path: Path
) -> None:
    canaries = tmp_path / "canaries"
    canaries.mkdir()
    port = free_port()
    worker = start_worker(
        QUEUE,
        concurrency=2,
        env={"SYNTH_METRICS_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")},
    )
    pid = worker.process.pid
    children = {c.pid for c in psutil.Process(pid).children()}
    target = queue_list(QUEUE)
    good = []
    expected: Counter[tuple[str, str]] = Counter()
    for round_ in range(3):  # every class three times (new ids), good jobs around them
        bad = hostile_messages(QUEUE, canaries)
        expected.update((m.failure_class, m.reason) for m in bad)
        for i, message in enumerate(bad):
            rclient.lpush(target, message.raw)
            good.append(enqueue(SIDE_EFFECT, {"key": f"good-{round_}-{i}"}, queue=QUEUE))
    for handle in good:
        handle.wait(timeout=120)

    def all_refused() -> bool:
        return len(_refused()) >= sum(expected.values())

    assert wait_until(all_refused, timeout=60), Counter(
        (d["failure_class"], d["error_class"]) for d in _refused()
    )
    found = Counter((d["failure_class"], d["error_class"]) for d in _refused())
    assert found == expected
    # no hostile content ever ran: no executed side effect, no canary
    assert rclient.get("test:count:hostile-ran") is None
    assert not list(canaries.iterdir())
    # every good job ran once; nothing was put back on the queue
    assert all(
        rclient.get(f"test:count:good-{r}-{i}") == b"1" for r in range(3) for i in range(len(bad))
    )
    assert _waiting(rclient) == 0
    # the worker never exited, nor did its pool processes
    assert worker.process.poll() is None
    assert {c.pid for c in psutil.Process(pid).children()} == children
    log = worker.output()
    assert "Unrecoverable error" not in log and "WorkerLostError" not in log
    # logged per batch, not per message
    refused = sum(n for (failure, _), n in expected.items() if failure == "rejected_message")
    assert 0 < log.count("dead-lettered") < refused
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert not [
        r
        for r in records
        if r.get("event") == "job finished" and r.get("failure_class") == "rejected_message"
    ]
    assert any(r.get("event") == "job finished" for r in records)  # the good jobs' lines
    # what is stored of a refused message is its first bytes, cut before decoding
    stored = [d["payload"] for d in _refused() if d["error_class"] in ("size", "compression")]
    assert stored and all(len(p["raw"]) <= 4 * 4096 for p in stored)
    # counted by reason
    found_metrics = samples(port)

    def counted() -> bool:
        metrics = samples(port)
        by_reason = Counter(
            "binding" if failure == "invalid_payload" else reason
            for (failure, reason), n in expected.items()
            for _ in range(n)
        )
        return all(
            value(metrics, "synth_rejected_messages_total", reason=r) == n
            for r, n in by_reason.items()
        )

    assert wait_until(counted, timeout=10, interval=0.2), found_metrics


def test_refused_messages_name_the_layer_and_keep_their_id(rclient: Any, start_worker: Any) -> None:
    start_worker(QUEUE)
    job_id = str(uuid.uuid4())
    message = envelope(queue=QUEUE, job_id=job_id, body=b'"just a string"')
    rclient.lpush(queue_list(QUEUE), raw(message))
    assert wait_until(lambda: app.ledger.get(job_id) is not None, timeout=30)
    row = app.ledger.get(job_id)
    assert row is not None
    assert (row["state"], row["failure_class"], row["error_class"]) == (
        "dead",
        "rejected_message",
        "body",
    )
    assert "[args, kwargs, embed]" in row["last_error"]
    assert row["payload"]["raw"] == '"just a string"'  # the body as it came, not re-encoded


def test_compression_bomb_allowed_is_capped_without_inflating(
    rclient: Any, start_worker: Any
) -> None:
    """With compression allowed, 256 MiB of zeros is refused once past the payload cap,
    decompressed as a stream: the worker's memory (main and pool) grows by < 100 MiB."""
    worker = start_worker(QUEUE, env={"SYNTH_ALLOW_COMPRESSION": "true"})
    main = psutil.Process(worker.process.pid)

    def total_rss() -> int:
        procs = [main, *main.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs if p.is_running())

    before = total_rss()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], total_rss())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    bomb = envelope(
        queue=QUEUE,
        kwargs={"key": "bomb"},
        headers={"compression": "application/x-gzip"},
        body=zeros_bomb(256 << 20),
    )
    small = envelope(
        queue=QUEUE,
        kwargs={"key": "small-compressed"},
        headers={"compression": "application/x-gzip"},
    )
    import base64
    import zlib

    small["body"] = base64.b64encode(zlib.compress(base64.b64decode(small["body"]))).decode()
    rclient.lpush(queue_list(QUEUE), raw(bomb))
    rclient.lpush(queue_list(QUEUE), raw(small))
    after = enqueue(SIDE_EFFECT, {"key": "after-bomb"}, queue=QUEUE)
    after.wait(timeout=60)
    assert wait_until(lambda: rclient.get("test:count:small-compressed") == b"1", timeout=30)
    stop.set()
    sampler.join()
    dead = _refused()
    assert [(d["error_class"], d["task"]) for d in dead] == [("compression", SIDE_EFFECT)]
    assert rclient.get("test:count:bomb") is None
    grown = (max(peak[0], total_rss()) - before) / (1 << 20)
    print(f"compression bomb: worker memory (main and pool) grew by {grown:.1f} MiB")
    assert grown < 100, f"worker memory grew by {grown:.0f} MiB"
    assert worker.process.poll() is None


def test_eta_message_waits_in_the_ledger_not_in_worker_memory(
    rclient: Any, start_worker: Any
) -> None:
    start_worker(QUEUE)
    job_id = str(uuid.uuid4())
    eta = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    message = envelope(queue=QUEUE, job_id=job_id, kwargs={"key": "eta"}, headers={"eta": eta})
    rclient.lpush(queue_list(QUEUE), raw(message))
    assert wait_until(lambda: (app.ledger.get(job_id) or {}).get("state") == "scheduled", 30)
    assert _waiting(rclient) == 0 and rclient.get("test:count:eta") is None
    assert wait_until(lambda: (app.ledger.get(job_id) or {}).get("state") == "succeeded", 30)
    assert rclient.get("test:count:eta") == b"1"
    row = app.ledger.get(job_id)
    assert row is not None and row["state"] == "succeeded"
    assert row["started_at"] >= datetime.fromisoformat(eta) - timedelta(seconds=0.5)


def test_expired_message_of_a_queued_job_cancels_it(rclient: Any, start_worker: Any) -> None:
    """A job with a ledger row whose message expired ends cancelled (Celery's revoked)."""
    job_id = str(uuid.uuid4())
    app.ledger.adopt(job_id, SIDE_EFFECT, QUEUE, 5, {"key": "expired-row"}, None)
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    message = envelope(
        queue=QUEUE, job_id=job_id, kwargs={"key": "expired-row"}, headers={"expires": past}
    )
    rclient.lpush(queue_list(QUEUE), raw(message))
    start_worker(QUEUE)
    assert wait_until(lambda: (app.ledger.get(job_id) or {}).get("state") == "cancelled", 30)
    assert rclient.get("test:count:expired-row") is None
    assert "expired" in (app.ledger.get(job_id) or {}).get("last_error", "")


def test_hostile_envelope_keys_cannot_pose_as_a_refusal(rclient: Any, start_worker: Any) -> None:
    """A sender's own ``synth_refused`` key is dropped with the rest of the unknown fields:
    a good message carrying one still runs."""
    start_worker(QUEUE)
    message = envelope(queue=QUEUE, kwargs={"key": "posing"})
    message["synth_refused"] = {"reason": "size", "detail": "fake", "raw": "fake"}
    rclient.lpush(queue_list(QUEUE), json.dumps(message).encode())
    assert wait_until(lambda: rclient.get("test:count:posing") == b"1", timeout=30)
    assert _refused() == []


def test_foreign_priorities_run_on_the_nearest_step(rclient: Any, start_worker: Any) -> None:
    """kombu accepts priorities up to 255 and files any above 9 on the last step; such a
    message (from another Celery app) runs, with a priority the ledger can hold."""
    start_worker(QUEUE)
    job_id = str(uuid.uuid4())
    message = envelope(
        queue=QUEUE, job_id=job_id, kwargs={"key": "p255"}, properties={"priority": 255}
    )
    rclient.lpush(queue_list(QUEUE), raw(message))
    assert wait_until(lambda: (app.ledger.get(job_id) or {}).get("state") == "succeeded", 30)
    assert rclient.get("test:count:p255") == b"1"
