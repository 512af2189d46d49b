"""The ledger's promises, each against real Postgres, real Redis and real workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from synth_workers import JobCancelledError, JobState, app, enqueue
from synth_workers.deadletter import DeadLetterQueue, DLQFilter

from .conftest import ROOT, start_beat, stop_beat, wait_until

QUEUE = "ledger-test"
CLI = [sys.executable, "-m", "synth_workers.cli"]


def _count(rclient: Any, key: str) -> int:
    return int(rclient.get(f"test:count:{key}") or 0)


def _set_state(job_id: str, sql: str) -> None:
    with app.ledger.connection() as conn:
        conn.execute(f"UPDATE synth_jobs SET {sql} WHERE id = %s", (job_id,))


def test_enqueue_commits_the_row_before_returning(rclient: Any) -> None:
    h = enqueue("tests.e2e_tasks.side_effect", {"key": "row"}, priority="high", queue=QUEUE)
    with psycopg.connect(
        app.settings.database_url, autocommit=True, **app.ledger.connect_kwargs()
    ) as other:
        row = other.execute(
            "SELECT task, queue, priority, payload, state, attempt FROM synth_jobs WHERE id = %s",
            (h.id,),
        ).fetchone()
    assert row == ("tests.e2e_tasks.side_effect", QUEUE, 8, {"key": "row"}, "queued", 0)


def test_claim_is_fenced_and_late_completion_refused(rclient: Any) -> None:
    ledger = app.ledger
    h = enqueue("tests.e2e_tasks.side_effect", {"key": "fence"}, queue="nobody")
    first = ledger.claim(h.id, "worker-a")
    assert first is not None
    assert first.attempt == 1
    assert ledger.claim(h.id, "worker-b") is None  # already running
    # worker-a freezes: its lease expires and the reaper takes the job back
    _set_state(h.id, "lease_expires_at = now() - interval '1 minute'")
    requeued, poisoned = ledger.reap_expired()
    assert [j.id for j in requeued] == [h.id]
    assert poisoned == 0
    second = ledger.claim(h.id, "worker-b")
    assert second is not None
    assert second.attempt == 2
    assert ledger.succeed(first, "late") is False  # refused: attempt 1 no longer holds
    assert ledger.succeed(second, "ok") is True
    with ledger.connection() as conn:
        late = conn.execute(
            "SELECT attempt, owner, outcome FROM synth_late_completions WHERE job_id = %s", (h.id,)
        ).fetchall()
    assert late == [(1, "worker-a", "succeeded")]
    assert h.info()["result"] == "ok"
    assert h.info()["worker_losses"] == 1


def test_lease_renewal_is_one_statement_for_all_jobs(rclient: Any) -> None:
    ledger = app.ledger
    handles = [
        enqueue("tests.e2e_tasks.side_effect", {"key": f"r{i}"}, queue="nobody") for i in range(3)
    ]
    for h in handles:
        assert ledger.claim(h.id, "owner-x")
        _set_state(h.id, "lease_expires_at = now() + interval '1 second'")
    # Only the jobs named are renewed: one its worker stopped (self-fencing) is left to lapse.
    assert ledger.renew("owner-x", [handles[0].id]) == [(handles[0].id, False)]
    assert ledger.renew("owner-y", [h.id for h in handles]) == []  # not owner-y's
    renewed = ledger.renew("owner-x", [h.id for h in handles])
    assert sorted(job for job, _ in renewed) == sorted(h.id for h in handles)
    rows = [h.info()["lease_expires_at"] for h in handles]
    now = ledger.now()
    assert all((r - now).total_seconds() > app.settings.lease_seconds - 0.5 for r in rows)


def test_delayed_jobs_run_exactly_once_across_a_worker_restart(
    rclient: Any, start_worker: Any
) -> None:
    visibility = 1
    env = {"SYNTH_VISIBILITY_TIMEOUT": str(visibility)}
    worker = start_worker(QUEUE, env=env, concurrency=2)
    handles = [
        enqueue("tests.e2e_tasks.side_effect", {"key": f"d{i}"}, delay=3 * visibility, queue=QUEUE)
        for i in range(200)
    ]
    assert all(h.state() is JobState.SCHEDULED for h in handles[:5])
    # the delay lives in the ledger, not in Redis: nothing is on the queue yet
    assert rclient.llen(QUEUE) + sum(rclient.llen(f"{QUEUE}\x06\x16{n}") for n in range(1, 10)) == 0
    worker.stop()  # a restart while they wait
    assert all(h.state() is JobState.SCHEDULED for h in handles)
    start_worker(QUEUE, env=env, concurrency=2)
    assert wait_until(lambda: all(h.state() is JobState.SUCCEEDED for h in handles), timeout=90)
    # let any wrong redelivery happen: a job delayed as long again has run by then
    last = enqueue("tests.e2e_tasks.side_effect", {"key": "dz"}, delay=3 * visibility, queue=QUEUE)
    assert last.wait(timeout=60) == "dz"
    assert [_count(rclient, f"d{i}") for i in range(200)] == [1] * 200
    started = [h.info()["started_at"] for h in handles]
    enqueued = [h.info()["enqueued_at"] for h in handles]
    assert min((s - e).total_seconds() for s, e in zip(started, enqueued, strict=True)) >= 2.9


def test_poison_pill_is_dead_lettered_after_killing_3_workers(
    rclient: Any, start_worker: Any
) -> None:
    start_worker(QUEUE)
    h = enqueue("tests.e2e_tasks.suicide", {"key": "pill"}, queue=QUEUE)
    assert wait_until(lambda: h.state() is JobState.DEAD, timeout=60)
    info = h.info()
    assert info["failure_class"] == "poison_pill"
    assert info["worker_losses"] == 3
    assert _count(rclient, "pill") == 3
    # counted by the worker's main process as each pool process died, not by the reaper once
    # the leases lapsed (synth_workers.poolwatch)
    assert info["error_class"] == "WorkerLostError", info
    # the worker goes on with other jobs
    assert enqueue("tests.e2e_tasks.side_effect", {"key": "after"}, queue=QUEUE).wait(30)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=60
    )


def test_dlq_list_show_replay_purge(rclient: Any, start_worker: Any) -> None:
    start_worker(QUEUE)
    rclient.set("test:flag:dl", 1)
    dead = [
        enqueue("tests.e2e_tasks.fails_while_flagged", {"key": "dl"}, queue=QUEUE) for _ in range(3)
    ]
    assert wait_until(lambda: all(h.state() is JobState.DEAD for h in dead), timeout=30)

    listed = json.loads(
        _cli("dlq", "list", "--task", "tests.e2e_tasks.fails_while_flagged", "--json").stdout
    )
    assert sorted(r["id"] for r in listed) == sorted(h.id for h in dead)
    assert {r["failure_class"] for r in listed} == {"exception"}
    assert json.loads(_cli("dlq", "list", "--failure-class", "poison_pill", "--json").stdout) == []
    shown = json.loads(_cli("dlq", "show", dead[0].id).stdout)
    assert shown["payload"] == {"key": "dl"}
    assert shown["error_class"] == "PermanentError"
    assert "flag is set" in shown["traceback"]

    # replay one by id, after fixing the cause: a new job, linked, fresh attempts
    rclient.delete("test:flag:dl")
    out = _cli("dlq", "replay", dead[0].id, "--json")
    assert out.returncode == 0, out.stderr
    pairs = json.loads(out.stdout)
    assert [p["original"] for p in pairs] == [dead[0].id]
    from synth_workers import JobHandle

    replay = JobHandle(pairs[0]["replay"])
    assert replay.wait(timeout=30) == "ok"
    assert str(replay.info()["replay_of"]) == dead[0].id
    assert replay.info()["attempt"] == 1
    assert dead[0].state() is JobState.DEAD  # the original stays in the DLQ, linked

    # replay by filter, then purge everything
    dlq = DeadLetterQueue(app)
    again = dlq.replay(where=DLQFilter(task="tests.e2e_tasks.fails_while_flagged", newer_than=3600))
    assert len(again) == 3
    assert _cli("dlq", "purge", "--all", "--yes").stdout.strip() == "purged 3 job(s)"
    assert dlq.count() == 0


def test_dlq_retention_by_count_and_age(rclient: Any) -> None:
    dlq = DeadLetterQueue(app)
    ids = []
    for i in range(5):
        h = enqueue("tests.e2e_tasks.side_effect", {"key": f"ret{i}"}, queue="nobody")
        _set_state(
            h.id,
            f"state = 'dead', failure_class = 'exception', "
            f"finished_at = now() - interval '{i} hours'",
        )
        ids.append(h.id)
    s = app.settings
    app.settings = s.model_copy(update={"dlq_max_count": 3, "dlq_max_age": 3.5 * 3600})
    try:
        done = dlq.apply_retention()
    finally:
        app.settings = s
    assert done["dead_aged"] == 1  # 4 hours old
    assert done["dead_over_count"] == 1  # 4 left, keep 3
    assert sorted(r["id"].hex for r in dlq.list_dead()) == sorted(
        __import__("uuid").UUID(i).hex for i in ids[:3]
    )


def test_idempotency_key_dedupes_in_the_ledger(rclient: Any) -> None:
    a = enqueue("tests.e2e_tasks.side_effect", {"key": "i"}, idempotency_key="k-1", queue=QUEUE)
    b = enqueue("tests.e2e_tasks.side_effect", {"key": "i"}, idempotency_key="k-1", queue=QUEUE)
    c = enqueue("tests.e2e_tasks.side_effect", {"key": "i"}, idempotency_key="k-2", queue=QUEUE)
    assert b.id == a.id
    assert b.deduplicated
    assert c.id != a.id
    with app.ledger.connection() as conn:
        assert conn.execute("SELECT count(*) FROM synth_jobs").fetchone() == (2,)
        # once the window has passed the key is free again
        conn.execute("UPDATE synth_idempotency SET expires_at = now() - interval '1 second'")
    d = enqueue("tests.e2e_tasks.side_effect", {"key": "i"}, idempotency_key="k-1", queue=QUEUE)
    assert d.id != a.id
    assert not d.deduplicated


def test_effect_guard_records_an_outside_effect_once(rclient: Any, start_worker: Any) -> None:
    start_worker(QUEUE)
    h = enqueue("tests.e2e_tasks.guarded", {"key": "g"}, queue=QUEUE)
    assert h.wait(timeout=30) == 2  # ran twice
    assert _count(rclient, "g") == 1  # the effect happened once
    with app.ledger.connection() as conn:
        assert conn.execute(
            "SELECT key FROM synth_effects WHERE job_id = %s", (h.id,)
        ).fetchall() == [("sent",)]


def test_outbox_commit_publishes_and_rollback_leaves_nothing(
    rclient: Any, start_worker: Any
) -> None:
    start_worker(QUEUE)
    with psycopg.connect(app.settings.database_url, **app.ledger.connect_kwargs()) as conn:
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE orders (id int)")
            rolled = enqueue("tests.e2e_tasks.side_effect", {"key": "rb"}, queue=QUEUE, conn=conn)
            conn.execute("INSERT INTO orders VALUES (1)")
            # not visible to anyone before commit
            assert app.ledger.get(rolled.id) is None
            raise psycopg.Rollback()
        assert app.ledger.get(rolled.id) is None

        with conn.transaction():
            kept = enqueue("tests.e2e_tasks.side_effect", {"key": "ok"}, queue=QUEUE, conn=conn)
            # the worker's relay runs meanwhile (a job enqueued after has run) and sees nothing
            probe = enqueue("tests.e2e_tasks.side_effect", {"key": "probe"}, queue=QUEUE)
            assert probe.wait(timeout=15) == "probe"
            assert app.ledger.get(kept.id) is None
        # committed: published by the workers' outbox relay (woken by NOTIFY)
        assert kept.wait(timeout=15) == "ok"
    after = enqueue("tests.e2e_tasks.side_effect", {"key": "after-rb"}, queue=QUEUE)
    assert after.wait(timeout=15) == "after-rb"  # anything wrongly published ran before
    assert _count(rclient, "rb") == 0
    assert _count(rclient, "ok") == 1


def test_cancel_is_durable_while_no_worker_runs(rclient: Any, start_worker: Any) -> None:
    h = enqueue("tests.e2e_tasks.side_effect", {"key": "cx"}, queue=QUEUE)
    later = enqueue("tests.e2e_tasks.side_effect", {"key": "after-cx"}, queue=QUEUE)
    out = _cli("jobs", "cancel", h.id)
    assert out.returncode == 0, out.stdout + out.stderr
    assert h.state() is JobState.CANCELLED
    start_worker(QUEUE)
    assert later.wait(timeout=30) == "after-cx"
    assert _count(rclient, "cx") == 0
    with pytest.raises(JobCancelledError):
        h.wait(timeout=1)


def test_cancel_asks_a_running_job_to_stop(rclient: Any, start_worker: Any) -> None:
    start_worker(QUEUE)
    h = enqueue("tests.e2e_tasks.long_running", {"key": "lr", "seconds": 30}, queue=QUEUE)
    assert wait_until(lambda: rclient.get("test:started:lr") is not None, timeout=30)
    t0 = time.monotonic()
    assert h.cancel() is False  # running: asked, not yet stopped
    with pytest.raises(JobCancelledError):
        h.wait(timeout=20)
    assert time.monotonic() - t0 < 10  # it stopped long before its 30 s


def test_jobs_cli_list_and_show(rclient: Any) -> None:
    a = enqueue("tests.e2e_tasks.side_effect", {"key": "l1"}, queue="nobody")
    enqueue("tests.e2e_tasks.record", {"label": "l2"}, queue="nobody", delay=60)
    out = _cli("jobs", "list", "--state", "queued", "--json")
    assert out.returncode == 0, out.stderr
    assert [r["id"] for r in json.loads(out.stdout)] == [a.id]
    both = json.loads(_cli("jobs", "list", "--queue", "nobody", "--json").stdout)
    assert {r["state"] for r in both} == {"queued", "scheduled"}
    shown = json.loads(_cli("jobs", "show", a.id).stdout)
    assert shown["task"] == "tests.e2e_tasks.side_effect"
    assert shown["state"] == "queued"
    text = _cli("jobs", "list", "--task", "tests.e2e_tasks.record").stdout
    assert "scheduled" in text


def test_two_beats_enqueue_each_slot_once(rclient: Any, tmp_path: Path, start_worker: Any) -> None:
    start_worker("default")
    beats = [start_beat(tmp_path / f"beat-{i}") for i in range(2)]

    def slots_taken() -> int:
        with app.ledger.connection() as conn:
            row = conn.execute(
                "SELECT count(*) FROM synth_periodic_slots WHERE name = 'test-fast'"
            ).fetchone()
        return int(row[0]) if row else 0

    try:
        assert wait_until(lambda: slots_taken() >= 7, timeout=60)
    finally:
        outs = [stop_beat(proc) for proc in beats]
    with app.ledger.connection() as conn:
        slots = conn.execute(
            "SELECT slot FROM synth_periodic_slots WHERE name = 'test-fast' ORDER BY slot"
        ).fetchall()
    jobs = app.ledger.list_jobs(task="tests.e2e_tasks.side_effect", limit=1000)
    assert len(slots) >= 5, outs
    assert len(jobs) == len(slots)  # one job per slot, not one per beat
    assert wait_until(lambda: _count(rclient, "beat") == len(slots), timeout=15)
    # both beats were live: one of them found slots already taken by the other
    assert any("already enqueued by another beat" in out for out in outs), outs


def test_message_sent_around_the_ledger_is_adopted(rclient: Any, start_worker: Any) -> None:
    start_worker(QUEUE)
    result = app.send_task("tests.e2e_tasks.side_effect", kwargs={"key": "adopted"}, queue=QUEUE)
    from synth_workers import JobHandle

    handle = JobHandle(result.id)
    assert wait_until(lambda: app.ledger.get(result.id) is not None, timeout=30)
    assert handle.wait(timeout=30) == "adopted"
    assert handle.info()["queue"] == QUEUE
    assert _count(rclient, "adopted") == 1


def test_reconcile_finds_waiting_messages_from_the_tail(rclient: Any) -> None:
    from synth_workers.ledger.transport import ids_in_redis

    handles = [
        enqueue("tests.e2e_tasks.side_effect", {"key": f"t{i}"}, queue="nobody") for i in range(30)
    ]
    oldest = {h.id for h in handles[:3]}
    assert ids_in_redis(app, {"nobody"}, oldest, chunk=7) == oldest
    missing = {"00000000-0000-0000-0000-000000000000"}
    assert ids_in_redis(app, {"nobody"}, oldest | missing, chunk=7) == oldest


def test_a_message_taken_but_not_yet_claimed_is_not_sent_again(rclient: Any) -> None:
    """The reconciler sends a job again only when its message was missing from Redis at two
    looks ``SYNTH_RECONCILE_GRACE`` apart. A worker that took the message in between
    (prefetched, or held in a batch) has claimed the job by the second look; a copy sent at
    the first look was a duplicate (a clean-clone run saw one share a batch with a poison
    pill's mates and run it once more than counted)."""
    from synth_workers.broker import message_id
    from synth_workers.ledger.sweeper import Sweeper
    from synth_workers.ledger.transport import priority_lists

    grace = app.settings.reconcile_grace
    now = [1000.0]
    sweeper = Sweeper(app, clock=lambda: now[0])
    taken = enqueue("tests.e2e_tasks.side_effect", {"key": "taken"}, queue="nobody")
    lost = enqueue("tests.e2e_tasks.side_effect", {"key": "lost"}, queue="nobody")
    # both published over the grace ago, and neither message in Redis any more
    with app.ledger.connection() as conn:
        conn.execute(
            "UPDATE synth_jobs SET published_at = now() - interval '1 minute' "
            "WHERE id = ANY(%s::uuid[])",
            ([taken.id, lost.id],),
        )
    rclient.delete(*priority_lists("nobody"))
    assert sweeper.reconcile() == 0  # the first look: both missing
    with app.ledger.connection() as conn:  # a worker claims the one it took
        conn.execute("UPDATE synth_jobs SET state = 'running' WHERE id = %s", (taken.id,))
    now[0] += grace / 2
    assert sweeper.reconcile() == 0  # missing, but not yet for a grace
    now[0] += grace / 2
    assert sweeper.reconcile() == 1
    sent = [
        message_id(raw) for key in priority_lists("nobody") for raw in rclient.lrange(key, 0, -1)
    ]
    assert sent == [lost.id]


def test_reconcile_passes_back_off_after_a_slow_one(
    rclient: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from synth_workers.ledger.sweeper import RECONCILE_BACKOFF, Sweeper

    now = [1000.0]  # the sweeper's clock, moved by the test (a pass "takes" pass_seconds)
    sweeper = Sweeper(app, clock=lambda: now[0])
    assert sweeper.reconcile_every == 1.0  # SYNTH_SWEEP_INTERVAL 0.2 (conftest) x 5
    passes: list[float] = []
    pass_seconds = 0.02

    def reconcile() -> int:
        passes.append(now[0])
        now[0] += pass_seconds
        return 0

    monkeypatch.setattr(sweeper, "reconcile", reconcile)
    sweeper.sweep()
    assert len(passes) == 1
    assert sweeper.reconcile_wait == 1.0  # a quick pass: the usual interval
    pass_seconds = 0.1  # a large old backlog to read: the next pass waits 20x as long
    now[0] += 0.99
    sweeper.sweep()
    assert len(passes) == 1  # not yet 1 s since the end of the last pass
    now[0] += 0.01
    sweeper.sweep()
    assert len(passes) == 2
    assert sweeper.reconcile_wait == pytest.approx(pass_seconds * RECONCILE_BACKOFF)
    ended = now[0]  # the wait runs from the end of the slow pass
    for _ in range(30):  # 1.5 s of sweeps: past the usual 1 s, within 2 s
        now[0] += 0.05
        sweeper.sweep()
    assert len(passes) == 2
    now[0] = ended + sweeper.reconcile_wait
    sweeper.sweep()
    assert len(passes) == 3


@pytest.mark.parametrize(
    ("task", "failure_class"),
    [
        ("tests.e2e_tasks.slow_soft", "soft_timeout"),
        ("tests.e2e_tasks.slow_hard", "hard_timeout"),
    ],
)
def test_time_limits_dead_letter_with_their_failure_class(
    rclient: Any, start_worker: Any, task: str, failure_class: str
) -> None:
    start_worker(QUEUE)
    h = enqueue(task, {}, queue=QUEUE)
    assert wait_until(lambda: h.state() is JobState.DEAD, timeout=30), h.info()
    assert h.info()["failure_class"] == failure_class


def test_db_migrate_is_idempotent() -> None:
    out = _cli("db", "migrate")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "up to date"


def test_dlq_digest_mails_a_summary(rclient: Any, start_worker: Any, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    start_worker(
        QUEUE,
        "email",
        "default",
        env={"SYNTH_DLQ_DIGEST_TO": "ops@example.com", "SYNTH_MAIL_OUTBOX": str(outbox)},
    )
    rclient.set("test:flag:dg", 1)
    dead = enqueue("tests.e2e_tasks.fails_while_flagged", {"key": "dg"}, queue=QUEUE)
    assert wait_until(lambda: dead.state() is JobState.DEAD, timeout=30)
    digest = enqueue("tasks.system.dlq_digest", {})
    summary = digest.wait(timeout=30)
    assert summary["dead"] == 1
    assert summary["sent"] is True
    from synth_workers import JobHandle

    JobHandle(summary["email_job"]).wait(timeout=30)
    text = next(outbox.glob("*.eml")).read_text()
    assert "To: ops@example.com" in text
    assert "tests.e2e_tasks.fails_while_flagged" in text


def test_lease_keeper_and_completer_threads_stop(rclient: Any) -> None:
    from synth_workers.ledger import LeaseKeeper
    from synth_workers.ledger.completer import Completer

    keeper = LeaseKeeper(app.ledger, lease_seconds=3)
    completer = Completer(app.ledger, keeper)
    job = enqueue("tests.e2e_tasks.side_effect", {"key": "stop"}, queue="nobody")
    claim = app.ledger.claim(job.id, keeper.owner)
    assert claim is not None
    keeper.add(job.id)
    completer.submit(claim, "done")
    threads = [keeper._thread, completer._thread]
    assert all(t is not None and t.is_alive() for t in threads)
    completer.stop()  # writes what is pending first
    keeper.stop()
    assert not any(t is not None and t.is_alive() for t in threads)
    assert job.state() is JobState.SUCCEEDED
    assert keeper.stopped and completer.stopped


def test_the_next_claim_waits_for_a_completion_write_in_flight(
    rclient: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The completer's thread took a finished job's completion and is writing it when the
    # process's next job is claimed: the claim's take() waits for that write, so the next
    # job (a poison pill, say) cannot kill the process with the completion still unwritten.
    import threading

    from synth_workers.ledger import LeaseKeeper
    from synth_workers.ledger.completer import Completer

    keeper = LeaseKeeper(app.ledger, lease_seconds=30)
    completer = Completer(app.ledger, keeper)
    writing, release = threading.Event(), threading.Event()
    succeed_many = app.ledger.succeed_many

    def slow(done: Any) -> Any:
        writing.set()
        release.wait(10)
        return succeed_many(done)

    monkeypatch.setattr(app.ledger, "succeed_many", slow)
    try:
        job = enqueue("tests.e2e_tasks.side_effect", {"key": "in-flight"}, queue="nobody")
        claim = app.ledger.claim(job.id, keeper.owner)
        assert claim is not None
        keeper.add(job.id)
        completer.submit(claim, "done")
        assert writing.wait(10), "the thread did not write after its linger"
        taken: list[Any] = []
        taker = threading.Thread(target=lambda: taken.append(completer.take()))
        taker.start()
        taker.join(0.3)
        assert taker.is_alive(), "take() returned while the thread's write was in flight"
        release.set()
        taker.join(10)
        assert taken == [[]]
        assert job.state() is JobState.SUCCEEDED  # written before take() returned
    finally:
        release.set()
        completer.stop()
        keeper.stop()


def test_after_an_outage_no_lease_is_reaped_until_owners_could_renew(rclient: Any) -> None:
    # A Postgres outage longer than a lease lapses every lease at once; live owners renew
    # (or write the completions they hold) once it is back. The sweeper gives them a whole
    # lease before it reaps anything: no worker loss, no second run.
    from synth_workers.ledger.sweeper import Sweeper

    now = [1000.0]
    sweeper = Sweeper(app, clock=lambda: now[0])
    h = enqueue("tests.e2e_tasks.side_effect", {"key": "outage"}, queue="nobody")
    assert app.ledger.claim(h.id, "worker-through-outage") is not None
    _set_state(h.id, "lease_expires_at = now() - interval '1 minute'")
    sweeper.note_outage()  # what its loop does when a pass finds Postgres out of reach
    sweeper.sweep()
    now[0] += app.settings.lease_seconds - 0.5
    sweeper.sweep()
    assert h.info()["state"] == JobState.RUNNING  # not reaped within the grace
    assert app.ledger.renew("worker-through-outage", [h.id]) == [(h.id, False)]  # the owner renews
    # An owner that is really gone: its lease lapses again and, past the grace, is reaped.
    _set_state(h.id, "lease_expires_at = now() - interval '1 minute'")
    now[0] += 1.0
    sweeper.sweep()
    info = h.info()
    assert info["state"] == JobState.QUEUED
    assert info["worker_losses"] == 1
