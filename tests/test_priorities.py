"""Strict priorities with a real worker process and a real Redis."""

from __future__ import annotations

from typing import Any

from synth_workers import JobState, enqueue
from synth_workers.routing import PRIORITY_LEVELS

from .conftest import wait_until

QUEUE = "prio-test"


def test_high_before_normal_before_low_fifo_within_level(rclient: Any, start_worker: Any) -> None:
    # 300 jobs while no worker runs: low, normal, high interleaved.
    expected: dict[str, list[str]] = {"high": [], "normal": [], "low": []}
    for i in range(100):
        for level in ("low", "normal", "high"):
            label = f"{level}-{i:03d}"
            enqueue("tests.e2e_tasks.record", {"label": label}, priority=level, queue=QUEUE)
            expected[level].append(label)

    worker = start_worker(QUEUE, concurrency=1)  # prefetch multiplier 1 (the default)
    assert wait_until(lambda: rclient.llen("test:order") == 300, timeout=120), worker.output()
    order = [x.decode() for x in rclient.lrange("test:order", 0, -1)]
    assert order == expected["high"] + expected["normal"] + expected["low"]


def test_integer_levels_bigger_runs_first(rclient: Any, start_worker: Any) -> None:
    handles = []
    for level in (0, 9, 3, PRIORITY_LEVELS["high"], 5):
        handles.append(
            enqueue("tests.e2e_tasks.record", {"label": str(level)}, priority=level, queue=QUEUE)
        )
    start_worker(QUEUE)
    assert wait_until(lambda: rclient.llen("test:order") == 5)
    assert [int(x) for x in rclient.lrange("test:order", 0, -1)] == [9, 8, 5, 3, 0]
    assert all(h.state() is JobState.SUCCEEDED for h in handles)


def test_retry_republishes_on_our_scale() -> None:
    # A request's delivery_info carries our scale (the worker's Request converts kombu's), so
    # the signature Celery builds from it for a retry keeps the level, unflipped.
    from celery.app.task import Context

    from synth_workers import app

    task = app.tasks["tests.e2e_tasks.flaky"]
    request = Context(
        id="x",
        args=(),
        kwargs={"key": "k", "fail_times": 1},
        retries=0,
        delivery_info={"priority": 8, "routing_key": QUEUE},
    )
    sig = task.signature_from_request(request)
    assert sig.options["priority"] == 8


def test_task_sees_our_scale_and_a_foreign_message_is_normal(
    rclient: Any, start_worker: Any, redis_url: str
) -> None:
    import json

    from celery import Celery

    from synth_workers import JobHandle, app

    from . import canvas_tasks

    probe = app.tasks["tests.canvas_tasks.prio_probe"]
    high = probe.apply_async(("high",), queue=canvas_tasks.QUEUE, priority="high")
    two = probe.apply_async(("two",), queue=canvas_tasks.QUEUE, priority=2)
    # A plain Celery producer, default settings: no priority (kombu files it as its 0).
    plain = Celery(broker=redis_url)
    try:
        foreign = plain.send_task(
            "tests.canvas_tasks.prio_probe", args=("foreign",), queue=canvas_tasks.QUEUE
        )
    finally:
        plain.close()
    start_worker(canvas_tasks.QUEUE, env={"SYNTH_INCLUDE": "tests.e2e_tasks,tests.canvas_tasks"})

    def seen(key: str) -> Any:
        raw = rclient.lrange(f"test:prio:{key}", 0, -1)
        return json.loads(raw[0]) if raw else None

    assert wait_until(lambda: all(seen(k) is not None for k in ("high", "two", "foreign")))
    assert seen("high") == PRIORITY_LEVELS["high"]
    assert seen("two") == 2
    assert seen("foreign") == PRIORITY_LEVELS["normal"]
    assert JobHandle(foreign.id).info()["priority"] == PRIORITY_LEVELS["normal"]
    assert JobHandle(high.id).info()["priority"] == PRIORITY_LEVELS["high"]
    # the task has run; its completion is written just after (deferred, ledger/completer.py)
    assert wait_until(lambda: JobHandle(two.id).state() is JobState.SUCCEEDED, timeout=10)


def test_a_message_without_priority_waits_behind_high(
    rclient: Any, start_worker: Any, redis_url: str
) -> None:
    from celery import Celery

    for i in range(3):
        enqueue("tests.e2e_tasks.record", {"label": f"high-{i}"}, priority="high", queue=QUEUE)
    enqueue("tests.e2e_tasks.record", {"label": "low"}, priority="low", queue=QUEUE)
    # kombu files a message sent without a priority on its most urgent list (as 0)
    plain = Celery(broker=redis_url)
    try:
        foreign = plain.send_task(
            "tests.e2e_tasks.record", kwargs={"label": "foreign"}, queue=QUEUE
        )
    finally:
        plain.close()
    start_worker(QUEUE, concurrency=1)
    assert wait_until(lambda: rclient.llen("test:order") == 5, timeout=60)
    order = [x.decode() for x in rclient.lrange("test:order", 0, -1)]
    assert order == ["high-0", "high-1", "high-2", "foreign", "low"]
    from synth_workers import JobHandle

    info = JobHandle(foreign.id).info()
    assert (info["priority"], info["state"], info["attempt"]) == (
        PRIORITY_LEVELS["normal"],
        JobState.SUCCEEDED,
        1,
    )
