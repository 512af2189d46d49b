"""Celery's result API answered from the ledger (``synth_workers.backend``), against real
prefork workers: ``delay().get()``, ``AsyncResult`` states, the original exception of a dead
job, REVOKED for a cancelled one, groups, a chord whose callback runs once although a part's
process is SIGKILLed, and Flower's result endpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import pytest
from celery import chord, group
from celery.exceptions import ChordError, TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

import tests.result_tasks as rt
from synth_workers import JobState, app
from synth_workers.resultconsumer import RECHECK_SECONDS

from .conftest import ROOT, http_json, stop_group, wait_until, waits_on_a_lock

ENV = {"SYNTH_INCLUDE": "tests.e2e_tasks,tests.result_tasks"}


def _ledger_state(job_id: str) -> str | None:
    row = app.ledger.get(job_id)
    return None if row is None else str(row["state"])


def test_get_waits_for_the_job_and_states_follow_it(rclient: Any, start_worker: Any) -> None:
    key = uuid.uuid4().hex
    # (quotes, backslashes, braces and commas: the completion sends results as an array
    # literal, synth_workers.ledger.rows.text_array)
    value = {"answer": 42, "text": 'say "hi" \\ {a,b} NULL é \\"'}
    result = rt.held.delay(key, value)
    # no worker yet: queued in the ledger, PENDING to Celery
    assert result.state == "PENDING" and result.status == "PENDING"
    assert not result.ready()
    start_worker(rt.QUEUE, env=ENV)
    assert wait_until(lambda: result.state == "STARTED", timeout=20)
    assert result.info["pid"] > 0 and result.info["hostname"]
    assert not result.ready()
    # get() waits for the job: it does not return None (or anything) while it runs
    with pytest.raises(CeleryTimeoutError):
        result.get(timeout=0.5)
    rclient.rpush(f"test:release:{key}", "go")
    assert result.get(timeout=10) == value
    assert result.state == "SUCCESS" and result.successful() and result.ready()
    assert not result.failed()
    assert result.result == value and result.info == value
    assert result.traceback is None
    assert _ledger_state(result.id) == "succeeded"
    # the ledger holds the result: no second copy in Redis
    assert not rclient.exists(f"celery-task-meta-{result.id}")


def test_get_returns_milliseconds_after_the_job_finishes(rclient: Any, start_worker: Any) -> None:
    start_worker(rt.QUEUE, env=ENV)
    latencies = []
    for _ in range(5):
        key = uuid.uuid4().hex
        result = rt.held.delay(key, key)
        assert wait_until(lambda k=key: bool(rclient.llen(f"test:started:{k}")), timeout=20)
        rclient.rpush(f"test:release:{key}", "go")
        assert result.get(timeout=10) == key
        returned = time.time()
        row = app.ledger.get(result.id)
        assert row is not None and row["state"] == "succeeded"
        latencies.append(returned - row["finished_at"].timestamp())
    print(
        "get() returned after the completion committed: "
        + ", ".join(f"{x * 1000:.1f} ms" for x in latencies)
    )
    # woken by the completion's PUBLISH, not by polling (Celery polls every 0.5 s)
    assert sorted(latencies)[len(latencies) // 2] < 0.1


def test_an_end_whose_notice_was_never_published_still_reaches_get(rclient: Any) -> None:
    """A completion that began just before the wait was noted publishes nothing (its
    snapshot holds no wait) and the waiter's read saw the job running: the waiter reads
    the waited rows again while it hears nothing (``synth_workers.resultconsumer``)."""
    key = uuid.uuid4().hex
    result = rt.held.delay(key, key)  # no worker: the row stays queued
    ended: list[float] = []

    def end_silently() -> None:
        time.sleep(0.5)  # get() has read the row (queued) and waits on its channel
        with app.ledger.connection() as conn:
            conn.execute(
                "UPDATE synth_jobs SET state = 'succeeded', result = %s::jsonb, "
                "finished_at = now() WHERE id = %s",
                (json.dumps(key), result.id),
            )
        ended.append(time.monotonic())

    ender = threading.Thread(target=end_silently)
    ender.start()
    try:
        assert result.get(timeout=10) == key
        returned = time.monotonic()
    finally:
        ender.join()
    assert returned - ended[0] < RECHECK_SECONDS + 1.5


def test_a_dead_job_raises_its_original_exception(rclient: Any, start_worker: Any) -> None:
    start_worker(rt.QUEUE, env=ENV)
    mine = rt.fails.delay("it broke", 7)
    with pytest.raises(rt.ResultError) as raised:
        mine.get(timeout=10)
    assert raised.value.args == ("it broke", 7)
    assert mine.state == "FAILURE" and mine.failed() and mine.ready()
    assert not mine.successful()
    assert isinstance(mine.result, rt.ResultError) and isinstance(mine.info, rt.ResultError)
    assert "tests.result_tasks.ResultError: ('it broke', 7)" in mine.traceback
    assert _ledger_state(mine.id) == "dead"
    builtin = rt.value_error.delay("bad value")  # dead on its last (only) attempt
    with pytest.raises(ValueError, match="bad value"):
        builtin.get(timeout=10)
    assert builtin.state == "FAILURE"
    # propagate=False hands the exception back
    assert isinstance(builtin.get(timeout=1, propagate=False), ValueError)


def test_a_cancelled_job_is_revoked(rclient: Any) -> None:
    result = rt.square.apply_async((3,), countdown=60)
    assert result.state == "PENDING"
    assert app.ledger.cancel(result.id) == "cancelled"
    assert result.state == "REVOKED" and result.ready()
    with pytest.raises(TaskRevokedError):
        result.get(timeout=5)


def test_every_ledger_state_maps_to_celerys(rclient: Any) -> None:
    result = rt.square.apply_async((3,), countdown=60)
    assert result.state == "PENDING"  # scheduled
    expected = {
        "queued": "PENDING",
        "running": "STARTED",
        "failed-retrying": "RETRY",
        "succeeded": "SUCCESS",
        "dead": "FAILURE",
        "cancelled": "REVOKED",
    }
    for state, celery_state in expected.items():
        with app.ledger.connection() as conn:
            conn.execute(
                "UPDATE synth_jobs SET state = %s, error_class = 'ConnectionError', "
                "last_error = 'refused' WHERE id = %s",
                (state, result.id),
            )
        assert AsyncResult(result.id, app=app).state == celery_state, state
    retrying = AsyncResult(result.id, app=app)
    with app.ledger.connection() as conn:
        conn.execute("UPDATE synth_jobs SET state = 'failed-retrying' WHERE id = %s", (result.id,))
    assert isinstance(retrying.info, ConnectionError)
    # an id nobody sent is PENDING, as in Celery
    assert AsyncResult(str(uuid.uuid4()), app=app).state == "PENDING"
    assert AsyncResult("not-a-uuid", app=app).state == "PENDING"


def test_group_get(rclient: Any, start_worker: Any) -> None:
    start_worker(rt.QUEUE, concurrency=2, env=ENV)
    result = group(rt.square.s(i) for i in range(6)).delay()
    assert result.get(timeout=20) == [0, 1, 4, 9, 16, 25]
    assert result.successful() and result.ready() and result.completed_count() == 6


def test_chord_callback_runs_once_when_a_part_is_sigkilled(rclient: Any, start_worker: Any) -> None:
    worker = start_worker(rt.QUEUE, concurrency=2, env=ENV)
    key = uuid.uuid4().hex
    result = chord([rt.part.s(key, i) for i in range(4)], rt.total.s(key)).delay()
    # part 0's first run waits; SIGKILL the pool process running it
    started = rclient.blpop([f"test:started:{key}"], timeout=20)
    assert started is not None
    victim = int(started[1])
    assert victim != worker.process.pid
    os.kill(victim, signal.SIGKILL)
    assert result.get(timeout=30) == 0 + 10 + 20 + 30
    assert int(rclient.get(f"test:runs:{key}:0")) == 2  # it ran again after the kill
    group_id = result.parent.id
    with app.ledger.connection() as conn:
        chord_row = conn.execute(
            "SELECT size, fired, callback_id FROM synth_chords WHERE group_id = %s", (group_id,)
        ).fetchone()
        counted = conn.execute(
            "SELECT count(*) FROM synth_chord_parts WHERE group_id = %s", (group_id,)
        ).fetchone()
    assert chord_row == (4, True, result.id)
    assert counted == (4,)
    # every part finished in the ledger (nothing left to run again), the callback ran once
    part_ids = [r.id for r in result.parent.results]
    assert wait_until(lambda: all(_ledger_state(i) == "succeeded" for i in part_ids), 20)
    assert _ledger_state(result.id) == "succeeded"
    assert rclient.lrange(f"test:callback:{key}", 0, -1) == [b"[0, 10, 20, 30]"]


def test_flower_task_result_agrees(rclient: Any, start_worker: Any) -> None:
    pytest.importorskip("flower")
    from .test_ops_flower import PASSWORD, USER, _flower_env
    from .test_ops_metrics import free_port

    start_worker(rt.QUEUE, env=ENV)
    done = rt.square.delay(12)
    assert done.get(timeout=10) == 144
    dead = rt.fails.delay("for flower", 1)
    with pytest.raises(rt.ResultError):
        dead.get(timeout=10)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "synth_workers", "flower", f"--port={port}"],
        cwd=ROOT,
        env=_flower_env(SYNTH_FLOWER_USER=USER, SYNTH_FLOWER_PASSWORD=PASSWORD, **ENV),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    auth = (USER, PASSWORD)
    try:
        assert wait_until(lambda: http_json(f"{base}/api/workers", None)[0] != 0, timeout=60)
        status, body = http_json(f"{base}/api/task/result/{done.id}", auth)
        assert status == 200 and body["state"] == "SUCCESS" and body["result"] == 144
        status, body = http_json(f"{base}/api/task/result/{dead.id}", auth)
        assert status == 200 and body["state"] == "FAILURE"
        assert "ResultError" in body["traceback"]
    finally:
        stop_group(proc)


def test_chord_with_a_dead_part_fails_its_callback(rclient: Any, start_worker: Any) -> None:
    start_worker(rt.QUEUE, concurrency=2, env=ENV)
    key = uuid.uuid4().hex
    result = chord([rt.square.s(2), rt.fails.s("part broke", 2)], rt.total.s(key)).delay()
    # as in Celery, get() raises the failed parent's error first
    with pytest.raises(rt.ResultError):
        result.get(timeout=20)
    # the callback itself fails with Celery's ChordError naming the dependency
    assert wait_until(lambda: result.state == "FAILURE", timeout=10)
    assert isinstance(result.result, ChordError) and "part broke" in str(result.result)
    with pytest.raises(ChordError):
        result.get(timeout=5, follow_parents=False)
    assert rclient.llen(f"test:callback:{key}") == 0  # the callback never ran


def test_chord_callback_runs_once_when_the_whole_worker_is_sigkilled(
    rclient: Any, start_worker: Any
) -> None:
    """The reaper takes part 0 back from a worker killed with all its processes; the re-run
    counts once and the callback runs once."""
    first = start_worker(rt.QUEUE, concurrency=2, env=ENV)
    key = uuid.uuid4().hex
    result = chord([rt.part.s(key, i) for i in range(4)], rt.total.s(key)).delay()
    assert rclient.blpop([f"test:started:{key}"], timeout=20) is not None
    others = [r.id for r in result.parent.results[1:]]
    assert wait_until(lambda: all(_ledger_state(i) == "succeeded" for i in others), 20)
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait()
    start_worker(rt.QUEUE, concurrency=2, env=ENV)
    assert result.get(timeout=40) == 60
    assert int(rclient.get(f"test:runs:{key}:0")) == 2
    part_ids = [r.id for r in result.parent.results]
    assert wait_until(lambda: all(_ledger_state(i) == "succeeded" for i in part_ids), 20)
    assert rclient.lrange(f"test:callback:{key}", 0, -1) == [b"[0, 10, 20, 30]"]


def test_wrong_arguments_fail_as_a_type_error(start_worker: Any) -> None:
    # Celery's typing=False: sent unchecked; the call fails in the worker with a TypeError
    start_worker(rt.QUEUE, env=ENV)
    result = rt.add_not_typed.delay(5)
    with pytest.raises(TypeError):
        result.get(timeout=30)
    assert result.status == "FAILURE"
    assert app.ledger.get(result.id)["attempt"] == 1  # never retried


def test_pydantic_models_as_arguments(start_worker: Any) -> None:
    start_worker(rt.QUEUE, env=ENV)
    result = rt.add_pair.delay(rt.Pair(x=2, y=3))
    assert result.get(timeout=30) == {"sum": 5}
    assert app.ledger.get(result.id)["args"] == [{"x": 2, "y": 3}]


def test_ignored_results_read_as_celery_reports_them(start_worker: Any) -> None:
    # Celery stores nothing for a job whose result is ignored: PENDING, no result. The
    # ledger still records the job's outcome.
    start_worker(rt.QUEUE, env=ENV)
    sent = rt.square.apply_async((3,), ignore_result=True)
    assert sent.get(timeout=5) is None  # Celery's AsyncResult.ignored: at once
    by_task = app.send_task(rt.square_ignored.name, args=(4,), queue=rt.QUEUE)
    for job_id in (sent.id, by_task.id):
        assert wait_until(
            lambda job_id=job_id: (app.ledger.get(job_id) or {}).get("state") == JobState.SUCCEEDED,
            timeout=30,
        )
        assert app.AsyncResult(job_id).state == "PENDING"
        assert app.AsyncResult(job_id).result is None
    assert app.ledger.get(by_task.id)["result"] == 16


def test_a_retrying_job_reports_its_original_exception(start_worker: Any) -> None:
    start_worker(rt.QUEUE, env=ENV)
    result = rt.retry_later.delay("again")
    assert wait_until(lambda: result.state == "RETRY", timeout=30)
    assert isinstance(result.result, rt.ResultError)  # the class, not only its name
    assert result.result.args == ("again", 7)
    result.revoke()


def test_only_a_waited_on_success_is_announced(rclient: Any, start_worker: Any) -> None:
    # get()/then() mark the job waited on before subscribing; the completion reads the mark:
    # a job nobody waits on publishes nothing on Celery's result channel.
    start_worker(rt.QUEUE, env=ENV)
    listener = rclient.pubsub()
    listener.psubscribe("celery-task-meta-*")
    assert listener.get_message(timeout=5)["type"] == "psubscribe"
    unwaited = rt.square.delay(5)
    assert wait_until(
        lambda: (app.ledger.get(unwaited.id) or {}).get("state") == JobState.SUCCEEDED,
        timeout=30,
    )
    waited = rt.square.delay(6)
    assert waited.get(timeout=30) == 36
    channels = []
    while (message := listener.get_message(timeout=1)) is not None:
        channels.append(message["channel"].decode())
    listener.close()
    assert f"celery-task-meta-{waited.id}" in channels
    assert f"celery-task-meta-{unwaited.id}" not in channels
    assert unwaited.get(timeout=5) == 25  # finished before anyone waited: read at once


def test_reject_requeued_runs_again_and_reject_for_good_fails(start_worker: Any) -> None:
    from celery.exceptions import Reject

    start_worker(rt.QUEUE, env=ENV)
    again = rt.reject_then_succeed.delay()
    assert again.get(timeout=30) == "second-pass"
    assert app.ledger.get(again.id)["attempt"] == 2
    refused = rt.reject_for_good.delay()
    with pytest.raises(Reject):
        refused.get(timeout=30)
    assert refused.status == "FAILURE"
    assert app.ledger.get(refused.id)["state"] == JobState.DEAD


def _maybe_waited(*ids: str) -> list[bool]:
    with app.ledger.connection() as conn:
        rows = dict(
            conn.execute(
                "SELECT id::text, maybe_waited FROM synth_jobs WHERE id = ANY(%s::uuid[])",
                (list(ids),),
            ).fetchall()
        )
    return [rows[i] for i in ids]


def test_waits_are_looked_up_only_for_a_job_that_may_be_waited_on(rclient: Any) -> None:
    """The completion reads ``synth_waits`` only for rows marked ``maybe_waited`` (migration
    0013): off only where the platform made the id and committed the row before anyone had
    it; a waiter marks such a row itself. Every other way in keeps it on."""
    import psycopg

    from synth_workers import enqueue, enqueue_many
    from synth_workers.ledger.results import mark_waited

    made = [
        rt.square.delay(2).id,
        enqueue("tests.e2e_tasks.side_effect", {"key": "a"}, queue="nobody").id,
        *(h.id for h in enqueue_many("tests.e2e_tasks.side_effect", [{"key": "b"}] * 2)),
    ]
    given = [
        rt.square.apply_async((3,), task_id=str(uuid.uuid4())).id,  # Celery's own task_id=
        enqueue("tests.e2e_tasks.side_effect", {"key": "c"}, job_id=str(uuid.uuid4())).id,
        rt.square.s(4).freeze().id,  # not sent yet: no row (checked below)
    ]
    with (
        psycopg.connect(app.settings.database_url, **app.ledger.connect_kwargs()) as conn,
        conn.transaction(),
    ):  # the outbox: the handle is the caller's before the commit
        given.append(
            enqueue("tests.e2e_tasks.side_effect", {"key": "d"}, queue="nobody", conn=conn).id
        )
    assert _maybe_waited(*made) == [False] * 4
    assert _maybe_waited(*given[:2], given[3]) == [True] * 3
    mark_waited(app.ledger, [made[0], given[2]])
    assert _maybe_waited(made[0]) == [True]
    assert app.ledger.get(given[2]) is None
    with app.ledger.connection() as conn:
        noted = conn.execute(
            "SELECT count(*) FROM synth_waits WHERE job_id = ANY(%s::uuid[])",
            ([made[0], given[2]],),
        ).fetchone()
    assert noted is not None and noted[0] == 2


def test_get_on_an_id_before_its_job_is_sent(rclient: Any, start_worker: Any) -> None:
    """Waiting on an id whose row does not exist yet (a chain step's, a chord callback's, a
    caller-chosen one): the job sent later is announced to the waiter when it succeeds."""
    import threading

    start_worker(rt.QUEUE, env=ENV)
    job_id = str(uuid.uuid4())
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(AsyncResult(job_id, app=app).get(20)))
    waiter.start()

    def marked() -> bool:
        with app.ledger.connection() as conn:
            row = conn.execute("SELECT 1 FROM synth_waits WHERE job_id = %s", (job_id,)).fetchone()
        return row is not None

    assert wait_until(marked, timeout=10)
    rt.square.apply_async((7,), task_id=job_id)
    waiter.join(timeout=25)
    assert got == [49]


def test_a_mark_ended_as_a_deadlock_is_tried_again(rclient: Any) -> None:
    """Marking locks the rows it sets; a transaction holding one of them and then waiting for
    another the mark holds makes a deadlock. Postgres ends the mark (its own check runs
    first here), which tries again once the rows are free instead of failing ``get()``."""
    import threading

    import psycopg

    from synth_workers import enqueue
    from synth_workers.ledger.results import mark_waited

    ids = sorted(
        enqueue("tests.e2e_tasks.side_effect", {"key": k}, queue="nobody").id for k in "ab"
    )
    assert _maybe_waited(*ids) == [False, False]
    errors: list[BaseException] = []

    def mark() -> None:
        try:
            mark_waited(app.ledger, ids)
        except BaseException as exc:
            errors.append(exc)

    with psycopg.connect(app.settings.database_url, **app.ledger.connect_kwargs()) as other:
        other.execute("SET deadlock_timeout = '10s'")  # the mark's check (1 s) runs first
        touch = "UPDATE synth_jobs SET updated_at = now() WHERE id = %s"
        other.execute(touch, (ids[1],))  # holds the second row
        marker = threading.Thread(target=mark)
        marker.start()

        # the mark holds the first row and waits for the second
        assert wait_until(waits_on_a_lock("%maybe_waited = true%"), timeout=10)
        other.execute(touch, (ids[0],))  # the cycle: Postgres ends the mark, not this
        other.commit()
    marker.join(timeout=20)
    assert not marker.is_alive() and errors == []
    assert _maybe_waited(*ids) == [True, True]


def test_a_wait_noted_while_the_completion_waits_for_the_row_is_announced(
    rclient: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race behind a ``get()`` that heard nothing: the waiter's mark holds the job's row
    when the worker's completion statement starts, so the completion waits for the lock,
    with a snapshot from before the mark committed. It must still find the wait (the row's
    ``waited``, read in its newest version after the lock), or it publishes no notice while
    the waiter, having read the row before the completion committed, saw the job running."""
    import psycopg

    from synth_workers import enqueue
    from synth_workers.ledger.results import MARK

    job = enqueue("tests.e2e_tasks.side_effect", {"key": "raced"}, queue="nobody")
    claim = app.ledger.claim(job.id, "test-owner")
    assert claim is not None
    announced: list[tuple[set[str], set[str]]] = []
    monkeypatch.setattr(
        app.ledger, "_late_unless", lambda done, _claims, waited: announced.append((done, waited))
    )
    completer = threading.Thread(target=lambda: app.ledger.succeed_many([(claim, 1)]))
    with psycopg.connect(app.settings.database_url, **app.ledger.connect_kwargs()) as other:
        other.execute(MARK, {"ids": [job.id]})  # the mark, not committed yet: holds the row

        completer.start()

        assert wait_until(waits_on_a_lock("%j.lease_owner = v.owner%"), timeout=10)
        other.commit()
    completer.join(timeout=10)
    assert announced == [({job.id}, {job.id})]
