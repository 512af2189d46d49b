"""Retry policy with real worker processes: backoff bounds, attempts, never-retry errors."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from synth_workers import JobFailedError, JobHandle, JobState, app, enqueue
from synth_workers.runner import backoff_bound, full_jitter_backoff

from .conftest import wait_until

BASE = 0.5  # SYNTH_RETRY_BACKOFF_BASE set by conftest for workers and this process
QUEUE = "retry-test"


def test_backoff_is_full_jitter_within_bounds() -> None:
    rng = random.Random(7)
    for attempt, bound in ((1, 1.0), (2, 2.0), (3, 4.0), (10, 30.0)):
        assert backoff_bound(attempt, 1.0, 30.0) == bound
        samples = [full_jitter_backoff(attempt, 1.0, 30.0, rng) for _ in range(2000)]
        assert all(0.0 <= s <= bound for s in samples)
        # full jitter: spread over the whole range, mean near bound / 2
        assert min(samples) < bound * 0.05
        assert max(samples) > bound * 0.95
        assert abs(sum(samples) / len(samples) - bound / 2) < bound * 0.05


def test_fails_twice_then_succeeds_on_attempt_3(rclient: Any, start_worker: Any) -> None:
    start_worker(QUEUE)
    handle = enqueue("tests.e2e_tasks.flaky", {"key": "f2", "fail_times": 2}, queue=QUEUE)
    assert handle.wait(timeout=30) == 3
    info = handle.info()
    assert info["state"] == JobState.SUCCEEDED
    assert info["attempt"] == 3
    times = [float(t) for t in rclient.lrange("test:times:f2", 0, -1)]
    assert len(times) == 3
    for attempt, (earlier, later) in enumerate(itertools.pairwise(times), 1):
        bound = backoff_bound(attempt, BASE, 5.0)
        gap = later - earlier
        # full jitter: [0, bound], plus the sweep interval (0.2 s) and delivery overhead
        assert 0.0 <= gap <= bound + 0.8, (attempt, bound, gap)


def test_waiting_retry_is_in_the_ledger_not_the_worker(rclient: Any, start_worker: Any) -> None:
    start_worker(QUEUE)
    handle = enqueue("tests.e2e_tasks.flaky", {"key": "slow", "fail_times": 1}, queue=QUEUE)
    from .conftest import wait_until as until

    assert until(
        lambda: handle.state() is JobState.RETRYING or handle.state() is JobState.SUCCEEDED,
        timeout=30,
    )
    assert handle.wait(timeout=30) == 2


def test_connection_errors_retry_until_attempts_run_out(rclient: Any, start_worker: Any) -> None:
    start_worker(QUEUE)
    handle = enqueue("tests.e2e_tasks.always_failing", {"key": "af"}, queue=QUEUE)
    with pytest.raises(JobFailedError) as caught:
        handle.wait(timeout=30)
    assert caught.value.error_class == "ConnectionError"
    assert rclient.get("test:count:af") == b"3"  # default: 3 attempts in total
    assert handle.info()["attempt"] == 3
    assert handle.info()["failure_class"] == "exception"


def test_permanent_error_runs_once(rclient: Any, start_worker: Any) -> None:
    start_worker(QUEUE)
    handle = enqueue("tests.e2e_tasks.permanent", {"key": "perm"}, queue=QUEUE)
    with pytest.raises(JobFailedError) as caught:
        handle.wait(timeout=30)
    assert caught.value.error_class == "PermanentError"
    assert handle.state() is JobState.DEAD
    # give a wrongly scheduled retry the time to show up
    assert not wait_until(lambda: rclient.get("test:count:perm") != b"1", timeout=2.0)


def test_invalid_payload_at_the_worker_is_never_retried(rclient: Any, start_worker: Any) -> None:
    # Bypass enqueue's validation with Celery's own API: the worker refuses the payload.
    start_worker(QUEUE)
    task = app.tasks["tests.e2e_tasks.typed"]
    result = task.apply_async(kwargs={"order_id": "not-a-number", "email": "x"}, queue=QUEUE)
    from synth_workers import JobHandle

    handle = JobHandle(result.id)
    with pytest.raises(JobFailedError) as caught:
        handle.wait(timeout=30)
    assert caught.value.error_class == "InvalidPayloadError"
    assert handle.info()["attempt"] == 1
    assert rclient.keys("test:count:typed:*") == []


def test_deferring_is_capped_for_a_429_not_for_own_limits(rclient: Any, start_worker: Any) -> None:
    start_worker(QUEUE, env={"SYNTH_DEFER_MAX_SECONDS": "1.5", "SYNTH_MAX_ATTEMPTS": "2"})
    forever = enqueue(
        "tests.e2e_tasks.deferring",
        {"key": "cap", "times": -1, "wait": 0.2, "capped": True},
        queue=QUEUE,
    )
    own = enqueue(
        "tests.e2e_tasks.deferring",
        {"key": "own", "times": 10, "wait": 0.2, "capped": False},
        queue=QUEUE,
    )
    # A provider answering 429 forever: deferred (no attempt used) for 1.5 s, then each 429
    # is a failed attempt, and the job is dead-lettered when attempts run out.
    with pytest.raises(JobFailedError) as failed:
        forever.wait(timeout=60)
    assert failed.value.error_class == "RateLimitedError"
    assert "SYNTH_DEFER_MAX_SECONDS" in failed.value.error
    info = forever.info()
    assert info["state"] == JobState.DEAD
    assert info["failure_class"] == "rate_limited"
    assert info["attempt"] == 2
    runs = int(rclient.get("test:count:cap"))
    assert runs >= 4, runs  # two or more deferrals before the two failed attempts
    assert info["first_deferred_at"] is not None
    # A wait on the platform's own shared limit is not capped: 10 deferrals (well over 1.5 s),
    # then it succeeds on its first attempt.
    assert own.wait(timeout=60) == 11
    assert own.info()["attempt"] == 1
    assert own.info()["first_deferred_at"] is None


# --- Celery's retry API (tasks in tests/canvas_tasks.py set Celery's own options) -----------

CANVAS_ENV = {"SYNTH_INCLUDE": "tests.e2e_tasks,tests.canvas_tasks"}


def _celery_job(task_name: str, *args: Any) -> Any:
    from . import canvas_tasks

    return app.tasks[task_name].apply_async(args, queue=canvas_tasks.QUEUE)


def _runs(rclient: Any, key: str) -> int:
    return int(rclient.get(f"test:count:{key}") or 0)


def _retries_seen(rclient: Any, key: str) -> list[int]:
    return [int(x) for x in rclient.lrange(f"test:retries:{key}", 0, -1)]


def test_max_retries_counts_retries_not_runs(rclient: Any, start_worker: Any) -> None:
    from . import canvas_tasks

    start_worker(canvas_tasks.QUEUE, env=CANVAS_ENV)
    one = JobHandle(_celery_job("tests.canvas_tasks.auto_max1", "m1").id)
    five = JobHandle(_celery_job("tests.canvas_tasks.auto_max5", "m5").id)
    for handle in (one, five):
        with pytest.raises(JobFailedError) as caught:
            handle.wait(timeout=60)
        assert caught.value.error_class == "ValueError"  # Celery re-raises the exc given
    assert _runs(rclient, "m1") == 2  # max_retries=1: the run and one retry
    assert _runs(rclient, "m5") == 6  # beyond the platform's 3 attempts
    assert _retries_seen(rclient, "m5") == [0, 1, 2, 3, 4, 5]  # request.retries per run
    assert five.info()["retries"] == 5


def test_max_retries_none_is_unlimited_and_retries_count_up(
    rclient: Any, start_worker: Any
) -> None:
    from . import canvas_tasks

    start_worker(canvas_tasks.QUEUE, env=CANVAS_ENV)
    handle = JobHandle(_celery_job("tests.canvas_tasks.retry_until", "inf", 5).id)
    assert handle.wait(timeout=60) == 5
    assert _retries_seen(rclient, "inf") == [0, 1, 2, 3, 4]


def test_retry_without_exc_ends_in_max_retries_exceeded(rclient: Any, start_worker: Any) -> None:
    from . import canvas_tasks

    start_worker(canvas_tasks.QUEUE, env=CANVAS_ENV)
    handle = JobHandle(_celery_job("tests.canvas_tasks.retry_no_exc", "mre").id)
    with pytest.raises(JobFailedError) as caught:
        handle.wait(timeout=60)
    assert caught.value.error_class == "MaxRetriesExceededError"
    assert handle.state() is JobState.DEAD
    assert _runs(rclient, "mre") == 2


def test_dont_autoretry_for_fails_at_once(rclient: Any, start_worker: Any) -> None:
    from . import canvas_tasks

    start_worker(canvas_tasks.QUEUE, env=CANVAS_ENV)
    handle = JobHandle(_celery_job("tests.canvas_tasks.auto_skip", "skip").id)
    with pytest.raises(JobFailedError) as caught:
        handle.wait(timeout=60)
    assert caught.value.error_class == "KeyError"
    assert _runs(rclient, "skip") == 1
    assert not wait_until(lambda: _runs(rclient, "skip") > 1, timeout=1.5)


def test_retry_backoff_follows_celery_formula(rclient: Any, start_worker: Any) -> None:
    from celery.utils.time import get_exponential_backoff_interval

    from . import canvas_tasks

    start_worker(canvas_tasks.QUEUE, env=CANVAS_ENV)
    handle = JobHandle(_celery_job("tests.canvas_tasks.backoff2", "bo").id)
    with pytest.raises(JobFailedError):
        handle.wait(timeout=60)
    times = [float(t) for t in rclient.lrange("test:times:bo", 0, -1)]
    assert len(times) == 3  # max_retries=2
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    for retries, gap in enumerate(gaps):
        want = get_exponential_backoff_interval(2, retries, 600, full_jitter=False)
        assert want == (2, 4)[retries]
        # the sweep interval (0.2 s) and delivery on top, never less
        assert want <= gap <= want + 0.8, (retries, want, gaps)
