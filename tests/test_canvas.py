"""Celery's canvas across the ledger's re-publishes, with real worker processes.

The ledger keeps each job's Celery message whole (``synth_workers.message``), so chain,
``link`` and ``link_error`` behave as Celery documents when a job is retried, delayed,
reaped after its worker was SIGKILLed, or re-published by the reconciler.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from datetime import datetime
from typing import Any

import pytest
from celery import chain, chord, group

from synth_workers import JobHandle, JobState, app

from . import canvas_tasks as ct
from . import e2e_tasks  # noqa: F401 - registers always_failing in this process
from .conftest import wait_until

#: Workers load the canvas tasks besides the usual ones.
ENV = {"SYNTH_INCLUDE": "tests.e2e_tasks,tests.canvas_tasks"}


def _collected(rclient: Any, key: str) -> list[Any]:
    return [json.loads(x) for x in rclient.lrange(f"test:collect:{key}", 0, -1)]


def test_chain_step_that_retries_once_runs_the_next_step(rclient: Any, start_worker: Any) -> None:
    start_worker(ct.QUEUE, env=ENV)
    result = chain(ct.sig(ct.retry_once, "r1"), ct.sig(ct.collect, key="r1")).apply_async()
    assert wait_until(lambda: rclient.llen("test:collect:r1") == 1, timeout=30)
    assert _collected(rclient, "r1") == [2]  # the retried step's result, handed on
    assert [int(x) for x in rclient.lrange("test:retries:r1", 0, -1)] == [0, 1]
    first = JobHandle(result.parent.id)  # the chain's result is its last step's
    assert first.state() is JobState.SUCCEEDED
    assert first.info()["retries"] == 1


def test_chain_steps_with_countdown(rclient: Any, start_worker: Any) -> None:
    start_worker(ct.QUEUE, env=ENV)
    # A delayed first step (promoted by the sweeper) and a delayed middle step (sent by the
    # worker when the first finished): both wait in the ledger, the chain goes on.
    chain(
        ct.sig(ct.add, 1, 2).set(countdown=1),
        ct.sig(ct.add, 10).set(countdown=1),
        ct.sig(ct.collect, key="cd"),
    ).apply_async()
    with app.ledger.connection() as conn:
        assert wait_until(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM synth_jobs WHERE state = 'scheduled'"
                ).fetchone()[0]  # type: ignore[index]
                == 1
            ),
            timeout=5,
        )
    assert wait_until(lambda: rclient.llen("test:collect:cd") == 1, timeout=30)
    assert _collected(rclient, "cd") == [13]


def test_link_error_fires_after_the_last_attempt(rclient: Any, start_worker: Any) -> None:
    start_worker(ct.QUEUE, env=ENV)
    # Celery's retry options (autoretry_for, max_retries=1): two runs, then the errback.
    celery_policy = ct.auto_max1.apply_async(
        ("le1",), queue=ct.QUEUE, link_error=ct.sig(ct.on_error)
    )
    # The platform's policy (3 attempts), the errback kept through both retries.
    platform = app.tasks["tests.e2e_tasks.always_failing"].apply_async(
        kwargs={"key": "le2"}, queue=ct.QUEUE, link_error=ct.sig(ct.on_error)
    )
    ids = {celery_policy.id, platform.id}
    assert wait_until(lambda: rclient.llen("test:errback") == 2, timeout=60)
    assert {x.decode() for x in rclient.lrange("test:errback", 0, -1)} == ids
    assert rclient.get("test:count:le1") == b"2"
    assert rclient.get("test:count:le2") == b"3"
    for job_id in ids:
        assert JobHandle(job_id).state() is JobState.DEAD
    # fired once each, on the last attempt only
    assert not wait_until(lambda: rclient.llen("test:errback") > 2, timeout=1.5)


def test_link_runs_after_a_retry(rclient: Any, start_worker: Any) -> None:
    start_worker(ct.QUEUE, env=ENV)
    ct.retry_once.apply_async(("lk",), queue=ct.QUEUE, link=ct.sig(ct.collect, key="lk"))
    assert wait_until(lambda: rclient.llen("test:collect:lk") == 1, timeout=30)
    assert _collected(rclient, "lk") == [2]


def test_chain_survives_a_sigkilled_worker(rclient: Any, start_worker: Any) -> None:
    first = start_worker(ct.QUEUE, env=ENV)
    result = chain(ct.sig(ct.retry_then_hang, "kill"), ct.sig(ct.collect, key="kill")).apply_async()
    # run 1 retried; run 2 hangs: kill its worker (main process and pool) outright
    assert wait_until(lambda: rclient.get("test:count:kill") == b"2", timeout=30), first.output()
    os.killpg(first.process.pid, signal.SIGKILL)
    first.process.wait()
    start_worker(ct.QUEUE, env=ENV)  # its sweeper reaps the expired lease and re-publishes
    assert wait_until(lambda: rclient.llen("test:collect:kill") == 1, timeout=60)
    assert _collected(rclient, "kill") == [3]
    # request.retries counts retries, not worker losses
    assert [int(x) for x in rclient.lrange("test:retries:kill", 0, -1)] == [0, 1, 1]
    info = JobHandle(result.parent.id).info()
    assert info["worker_losses"] == 1
    assert info["retries"] == 1


def test_chain_survives_the_reconciler(rclient: Any, start_worker: Any) -> None:
    # No worker yet: the first step's message waits in Redis; then Redis loses it.
    result = chain(
        ct.sig(ct.add, 2, 3), ct.sig(ct.add, 4), ct.sig(ct.collect, key="rec")
    ).apply_async()
    assert wait_until(lambda: bool(rclient.keys(f"{ct.QUEUE}*")), timeout=5)
    for key in rclient.keys(f"{ct.QUEUE}*"):
        rclient.delete(key)
    assert JobHandle(result.parent.parent.id).state() is JobState.QUEUED
    start_worker(ct.QUEUE, env=ENV)  # its reconciler re-publishes the stored message
    assert wait_until(lambda: rclient.llen("test:collect:rec") == 1, timeout=60)
    assert _collected(rclient, "rec") == [9]


def test_dlq_replay_keeps_the_canvas(rclient: Any, start_worker: Any) -> None:
    from synth_workers.deadletter import DeadLetterQueue

    start_worker(ct.QUEUE, env=ENV)
    rclient.set("test:flag:dlq", "1")
    dead = app.tasks["tests.e2e_tasks.fails_while_flagged"].apply_async(
        kwargs={"key": "dlq"}, queue=ct.QUEUE, link=ct.sig(ct.collect, key="dlq")
    )
    assert wait_until(lambda: JobHandle(dead.id).state() is JobState.DEAD, timeout=30)
    rclient.delete("test:flag:dlq")
    [(original, replayed)] = DeadLetterQueue(app).replay([dead.id])
    assert original == dead.id
    assert wait_until(lambda: rclient.llen("test:collect:dlq") == 1, timeout=30)
    assert _collected(rclient, "dlq") == ["ok"]  # the link ran after the replayed job
    info = JobHandle(replayed).info()
    assert info["state"] == JobState.SUCCEEDED
    assert info["message"]["headers"]["id"] == dead.id  # as first sent; sent with its own id


def test_foreign_messages_keep_their_canvas(
    rclient: Any, start_worker: Any, redis_url: str
) -> None:
    # A plain Celery producer (no ledger row): one message with a countdown (the consumer
    # hands it to the ledger until due), one whose task retries (adopted by the worker).
    from celery import Celery

    plain = Celery(broker=redis_url)
    try:
        later = plain.send_task(
            "tests.canvas_tasks.add",
            args=(2, 5),
            countdown=1,
            queue=ct.QUEUE,
            link=plain.signature("tests.canvas_tasks.collect", kwargs={"key": "eta"}).set(
                queue=ct.QUEUE
            ),
        )
        retried = plain.send_task(
            "tests.canvas_tasks.retry_once",
            args=("fr",),
            queue=ct.QUEUE,
            link=plain.signature("tests.canvas_tasks.collect", kwargs={"key": "fr"}).set(
                queue=ct.QUEUE
            ),
        )
    finally:
        plain.close()
    start_worker(ct.QUEUE, env=ENV)
    assert wait_until(lambda: rclient.llen("test:collect:eta") == 1, timeout=30)
    assert wait_until(lambda: rclient.llen("test:collect:fr") == 1, timeout=30)
    assert _collected(rclient, "eta") == [7]
    assert _collected(rclient, "fr") == [2]
    assert [int(x) for x in rclient.lrange("test:retries:fr", 0, -1)] == [0, 1]
    for job_id in (later.id, retried.id):
        info = JobHandle(job_id).info()
        assert info["state"] == JobState.SUCCEEDED
        assert info["message"]["embed"]["callbacks"]  # the link, kept in the ledger


def test_republish_keeps_the_message_whole(rclient: Any) -> None:
    # No worker: a delayed job is promoted by one sweep of this process, and the message it
    # puts on Redis is compared with what was sent.
    import base64
    import uuid

    from synth_workers.ledger.sweeper import Sweeper
    from synth_workers.ledger.transport import priority_lists

    root, parent = str(uuid.uuid4()), str(uuid.uuid4())
    sent = ct.add.apply_async(
        (1, 2),
        queue=ct.QUEUE,
        priority="high",
        countdown=0.05,
        link=ct.sig(ct.collect, key="a"),
        link_error=ct.sig(ct.on_error),
        chord=ct.sig(ct.collect, key="chord"),
        group_id="the-group",
        group_index=3,
        root_id=root,
        parent_id=parent,
        expires=600,
        time_limit=30,
        soft_time_limit=20,
        shadow="shadowed",
        stamped_headers=["mystamp"],
        mystamp="stamped",
    )
    with app.ledger.connection() as conn:
        conn.execute("UPDATE synth_jobs SET retries = 2 WHERE id = %s", (sent.id,))
    sweeper = Sweeper(app)
    assert wait_until(lambda: sweeper.sweep()["promoted"] == 1, timeout=5)  # once due
    raw = [m for key in priority_lists(ct.QUEUE) for m in rclient.lrange(key, 0, -1)]
    assert len(raw) == 1
    envelope = json.loads(raw[0])
    headers = envelope["headers"]
    args, kwargs, embed = json.loads(base64.b64decode(envelope["body"]))
    assert (headers["id"], headers["task"], headers["retries"]) == (sent.id, ct.add.name, 2)
    # the wait was the ledger's; the message says when the job was due (Celery's request.eta)
    due = app.ledger.get(sent.id)["run_at"]
    assert datetime.fromisoformat(headers["eta"]) == due
    assert (headers["group"], headers["group_index"]) == ("the-group", 3)
    assert (headers["root_id"], headers["parent_id"]) == (root, parent)
    assert headers["expires"] is not None
    assert headers["timelimit"] == [30, 20]
    assert headers["shadow"] == "shadowed"
    assert headers["stamps"] == {"mystamp": "stamped"}
    assert (args, kwargs) == ([1, 2], {})
    assert [s["task"] for s in embed["callbacks"]] == [ct.collect.name]
    assert [s["task"] for s in embed["errbacks"]] == [ct.on_error.name]
    assert embed["chord"]["task"] == ct.collect.name
    assert envelope["properties"]["correlation_id"] == sent.id
    assert envelope["properties"]["priority"] == 1  # kombu's scale for our 8 (high)


def test_replace_hands_the_job_id_to_the_replacement(rclient: Any, start_worker: Any) -> None:
    start_worker(ct.QUEUE, env=ENV)
    result = ct.sig(ct.replaced, "rep", 5).apply_async()
    assert result.get(timeout=30) == 16  # (5 + 1) + 10, under the replaced job's id
    row = app.ledger.get(result.id)
    assert row["state"] == JobState.SUCCEEDED
    assert row["task"] == "tests.canvas_tasks.add"  # the replacement's last step
    assert int(rclient.get("test:count:rep")) == 1  # the replaced task ran once
    # the replaced attempt left no lease behind for the reaper to hand out again
    republished, _ = app.ledger.reap_expired()
    assert result.id not in {job.id for job in republished}


def test_a_task_returning_a_result_stores_it_as_celery_does(start_worker: Any) -> None:
    start_worker(ct.QUEUE, env=ENV)
    value = ct.sig(ct.returns_a_result).apply_async().get(timeout=30)
    # Celery's tuple form: ((id, parent), None), the parent (the chain's first step) alike
    (child_id, parent), group = value
    assert group is None
    assert wait_until(lambda: (app.ledger.get(child_id) or {}).get("result") == 4, timeout=30)
    (parent_id, _), _ = parent
    assert app.ledger.get(parent_id)["result"] == 2


def test_eager_apply_runs_here_with_no_ledger_row() -> None:
    result = ct.fails.apply(args=("x",), link_error=ct.sig(ct.add, 0, 0))
    assert result.state == "FAILURE"
    assert result.get(propagate=False).args == ("expected to fail", "x")
    assert app.ledger.get(result.id) is None
    assert ct.add.apply(args=(2, 3)).get() == 5


def test_chord_whose_body_is_a_group(start_worker: Any) -> None:
    # Celery upgrades group | group to a chord with a group body (Celery's own suite:
    # test_chain_of_task_a_group_and_a_chord): 1 -> [2, 2] -> [4, 4] -> 8
    start_worker(ct.QUEUE, concurrency=2, env=ENV)
    c = (
        ct.sig(ct.add, 1, 0).set(immutable=True)
        | group(ct.sig(ct.add, 1), ct.sig(ct.add, 1))
        | group(ct.sig(ct.tsum), ct.sig(ct.tsum))
        | ct.sig(ct.tsum)
    )
    assert c().get(timeout=30) == 8


def test_retry_with_new_arguments(start_worker: Any) -> None:
    start_worker(ct.QUEUE, env=ENV)
    switched = ct.sig(ct.retry_new_args).apply_async(kwargs={"foo": 1, "bar": 2, "label": "kept"})
    to_kwargs = ct.sig(ct.retry_new_kwargs).apply_async(args=(1, 2))
    assert switched.get(timeout=30) == {"foo": 2, "bar": 3, "label": "kept", "retries": 1}
    assert to_kwargs.get(timeout=30) == {"foo": 2, "bar": 2, "retries": 1}
    row = app.ledger.get(switched.id)
    assert (row["args"], row["payload"]) == ([2, 3], {"label": "kept"})


def test_retry_with_expires_ends_revoked_when_it_expires_first(
    rclient: Any, start_worker: Any
) -> None:
    start_worker(ct.QUEUE, env=ENV)
    result = ct.sig(ct.retry_expiring, "exp").apply_async()
    assert wait_until(
        lambda: (app.ledger.get(result.id) or {}).get("state") == JobState.CANCELLED, timeout=30
    )
    assert result.state == "REVOKED"
    assert int(rclient.get("test:count:exp")) == 1  # the retry never ran


def test_a_hard_time_limit_retry_counts_as_a_retry(rclient: Any, start_worker: Any) -> None:
    start_worker(ct.QUEUE, env=ENV)
    result = ct.sig(ct.hangs_once, "hard").apply_async()
    assert result.get(timeout=60) == 2
    assert [int(x) for x in rclient.lrange("test:retries:hard", 0, -1)] == [0, 1]
    assert app.ledger.get(result.id)["retries"] == 1


def test_a_group_with_a_link_calls_it(rclient: Any, start_worker: Any) -> None:
    # Celery links a group's callback to its first task (Celery's suite:
    # test_callback_called_by_group)
    start_worker(ct.QUEUE, concurrency=2, env=ENV)
    g = group(ct.sig(ct.add, 1, 1), ct.sig(ct.add, 2, 2))
    g.link(ct.sig(ct.collect, "called", key="grouplink").set(immutable=True))
    assert g.delay().get(timeout=30) == [2, 4]
    assert wait_until(lambda: _collected(rclient, "grouplink") == ["called"], timeout=30)


def test_a_delayed_job_runs_with_its_eta(start_worker: Any) -> None:
    start_worker(ct.QUEUE, env=ENV)
    sent = time.time()
    eta = ct.sig(ct.request_eta).apply_async(countdown=1).get(timeout=30)
    assert eta is not None  # Celery's request.eta: the time it was due
    assert datetime.fromisoformat(eta).timestamp() == pytest.approx(sent + 1, abs=1.5)


def test_a_chord_header_generator_runs_parts_as_they_come(rclient: Any, start_worker: Any) -> None:
    # Celery applies a header given as a generator part by part (Celery's suite:
    # test_chord.test_generator): the first part has run before the last is made.
    start_worker(ct.QUEUE, concurrency=2, env=ENV)
    seen_first: list[bool] = []

    def header() -> Any:
        for i in range(4):
            if i == 3:
                seen_first.append(
                    wait_until(lambda: rclient.llen("test:collect:gen") >= 1, timeout=5)
                )
            yield ct.sig(ct.collect, i, key="gen")

    assert chord(header(), ct.sig(ct.tsum))().get(timeout=30) == 6
    assert seen_first == [True]


def test_a_chords_errback_runs_when_a_header_part_fails(rclient: Any, start_worker: Any) -> None:
    start_worker(ct.QUEUE, concurrency=2, env=ENV)
    sig = chord((ct.sig(ct.fails), ct.sig(ct.add, 1, 1)), ct.sig(ct.tsum))
    sig.link_error(ct.sig(ct.on_error))
    body_id = sig.body.freeze().id
    with pytest.raises(ValueError, match="expected to fail"):
        sig.delay().get(timeout=30)
    assert wait_until(lambda: body_id.encode() in rclient.lrange("test:errback", 0, -1), timeout=30)


def test_a_chords_errback_runs_when_a_body_group_member_fails(
    rclient: Any, start_worker: Any
) -> None:
    start_worker(ct.QUEUE, concurrency=2, env=ENV)
    failing = ct.sig(ct.fails)
    failing_id = failing.freeze().id
    body = group(ct.sig(ct.add, 2, 2).set(immutable=True), failing)
    sig = chord((ct.sig(ct.add, 1, 1).set(immutable=True),), body)
    sig.link_error(ct.sig(ct.on_error))
    with pytest.raises(ValueError, match="expected to fail"):
        sig.delay().get(timeout=30)
    assert wait_until(
        lambda: failing_id.encode() in rclient.lrange("test:errback", 0, -1), timeout=30
    )


def test_a_chords_errback_runs_when_a_header_chain_fails_midway(
    rclient: Any, start_worker: Any
) -> None:
    start_worker(ct.QUEUE, concurrency=2, env=ENV)
    child = chain(
        ct.sig(ct.add, 1, 1).set(immutable=True),
        ct.sig(ct.fails),
        ct.sig(ct.add, 2, 2).set(immutable=True),
    )
    sig = chord((child,), ct.sig(ct.tsum))
    sig.link_error(ct.sig(ct.on_error))
    body_id = sig.body.freeze().id
    with pytest.raises(ValueError, match="expected to fail"):
        sig.delay().get(timeout=30)
    assert wait_until(lambda: body_id.encode() in rclient.lrange("test:errback", 0, -1), timeout=30)


def test_a_finished_job_sent_again_runs_again(rclient: Any, start_worker: Any) -> None:
    # Celery runs an id sent again (a frozen canvas applied twice); the ledger re-opens the
    # finished row for the new run. A live job sent again stays the same job.
    start_worker(ct.QUEUE, env=ENV)
    job_id = str(uuid.uuid4())
    first = ct.sig(ct.collect, 1, key="again").apply_async(task_id=job_id)
    assert first.get(timeout=30) == 1
    second = ct.sig(ct.collect, 2, key="again").apply_async(task_id=job_id)
    assert second.get(timeout=30) == 2
    assert _collected(rclient, "again") == [1, 2]
    row = app.ledger.get(job_id)
    assert (row["state"], row["attempt"], row["result"]) == (JobState.SUCCEEDED, 1, 2)


def test_a_chord_part_revoked_by_a_stamped_header_fails_the_chord_as_revoked(
    start_worker: Any,
) -> None:
    # Celery counts a part the worker discards (revoked by id or stamped header) as a chord
    # part; the chord fails and ``get()`` re-raises the part's TaskRevokedError. The ledger
    # cancels the part before it is counted, and the counting must not need an exception in
    # flight (it crashed in Celery's chord_error_from_stack, and the chord hung).
    from celery.canvas import StampingVisitor
    from celery.exceptions import TaskRevokedError
    from celery.result import AsyncResult

    start_worker(ct.QUEUE, concurrency=2, env=ENV)
    mark = uuid.uuid4().hex

    class Mark(StampingVisitor):
        def on_signature(self, sig: Any, **headers: Any) -> dict[str, Any]:
            return {"monitoring_id": mark, "stamped_headers": ["monitoring_id"]}

    part = ct.sig(ct.add, 1, 1).set(immutable=True)
    part.stamp(visitor=Mark())
    part_id = part.freeze().id
    replies = app.control.revoke_by_stamped_headers({"monitoring_id": mark}, reply=True)
    assert replies, "no worker answered the revoke"
    body = ct.sig(ct.tsum)
    result = chord([part, ct.sig(ct.add, 2, 2).set(immutable=True)], body).apply_async()
    with pytest.raises(TaskRevokedError):
        result.get(timeout=30)
    assert AsyncResult(part_id, app=app).state == "REVOKED"
    assert app.ledger.get(part_id)["state"] == JobState.CANCELLED
    assert wait_until(lambda: AsyncResult(result.id, app=app).state == "FAILURE", timeout=30)


@pytest.mark.parametrize("again", [False, True], ids=["first-run", "after-a-retry"])
def test_celerys_json_types_reach_the_task_as_sent(again: bool, start_worker: Any) -> None:
    # Celery's json serializer (kombu's) carries bytes, datetime, UUID and Decimal; the ledger
    # keeps them so, and a job published again from its row (a retry) gets them back.
    from decimal import Decimal

    start_worker(ct.QUEUE, env=ENV)
    values = (b"raw", datetime(2026, 1, 2, 3, 4, 5), uuid.uuid4(), Decimal("1.5"))
    result = ct.kinds.apply_async(
        args=values, kwargs={"at": datetime(2026, 1, 2), "again": again}, queue=ct.QUEUE
    )
    assert result.get(timeout=30) == ["bytes", "datetime", "UUID", "Decimal", "at:datetime"]
    row = app.ledger.get(result.id)
    assert (row["state"], row["retries"]) == (JobState.SUCCEEDED, 1 if again else 0)


def test_a_chord_header_ending_in_a_group_gives_the_body_nested_results(
    start_worker: Any,
) -> None:
    # Celery's Redis backend saves a header holding a group and passes its results nested
    # (Celery's suite: test_nested_chord_group_chain_group_tail); the ledger counts the parts
    # flat and nests them as the saved header says.
    start_worker(ct.QUEUE, concurrency=2, env=ENV)
    tail = group(ct.sig(ct.add, 2, 2).set(immutable=True), ct.sig(ct.add, 3, 3).set(immutable=True))
    header = chain(ct.sig(ct.add, 1, 1).set(immutable=True), tail)
    result = chord((header,), ct.sig(ct.collect, key="nested")).apply_async()
    assert result.get(timeout=30) == [[4, 6]]


def test_a_job_out_of_retries_raises_its_own_exception_class(start_worker: Any) -> None:
    # Celery's suite (test_tasks::test_retry): after the last retry, get() raises the class
    # the task gave self.retry(exc=...), not one Celery makes up for an unknown module.
    start_worker(ct.QUEUE, env=ENV)
    result = ct.retry_custom.apply_async(queue=ct.QUEUE)
    with pytest.raises(ct.CustomError, match="custom"):
        result.get(timeout=30)
    assert app.ledger.get(result.id)["error_module"] == "tests.canvas_tasks"
