"""The job tests/test_hosts.py runs on its worker hosts (loaded with SYNTH_INCLUDE).

Each run appends what happened to it to a file of the host it runs on
(``SYNTH_TEST_HOST_LOG``): ``<wall time> <event> <job id> <attempt>``, one line per write,
where event is ``start``, ``stop`` (self-fenced), ``done`` (its effect committed) or
``refused`` (its late effect refused by the ledger).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psycopg
from celery import shared_task

from synth_workers import PermanentError, ServiceUnavailableError, Task
from synth_workers.runner import LeaseLostError
from synth_workers.selffence import SelfFencedError


def _note(event: str, job_id: str, attempt: int) -> None:
    line = f"{time.time():.3f} {event} {job_id} {attempt}\n".encode()
    fd = os.open(os.environ["SYNTH_TEST_HOST_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@shared_task(name="tests.hosts_tasks.work", bind=True)  # on the test's own app too
def work(self: Task, n: int, seconds: float = 0.0, until: str | None = None) -> int:
    """Work ``seconds``, checking for a stop request every 50 ms, then write the job's effect
    row (exactly once, with its completion). ``until``: the first attempt instead ignores
    every stop request and waits until that file exists (a job that cannot be stopped),
    then tries its effect anyway."""
    claim = self.claim
    assert claim is not None
    _note("start", claim.job_id, claim.attempt)
    try:
        if until is not None and claim.attempt == 1:
            while not Path(until).exists():
                time.sleep(0.05)
        else:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                self.raise_if_cancelled()
                time.sleep(0.05)
        _effect(self, n, stoppable=until is None or claim.attempt > 1)
    except SelfFencedError:
        _note("stop", claim.job_id, claim.attempt)
        raise
    except LeaseLostError:
        _note("refused", claim.job_id, claim.attempt)
        raise
    _note("done", claim.job_id, claim.attempt)
    return n


def _effect(task: Task, n: int, stoppable: bool) -> None:
    claim = task.claim
    assert claim is not None
    for _ in range(20):  # a connection broken by a cut link is replaced on the next try
        if stoppable:
            task.raise_if_cancelled()  # cut off for longer than the lease: stop
        try:
            with task.effect_transaction() as conn:
                conn.execute(
                    "INSERT INTO host_effects (job_id, n, owner, host) VALUES (%s, %s, %s, %s)",
                    (claim.job_id, n, claim.owner, os.environ["SYNTH_TEST_HOST"]),
                )
            return
        except psycopg.errors.UniqueViolation:
            with task.app.ledger.connection() as conn:
                conn.execute("INSERT INTO host_duplicates (job_id) VALUES (%s)", (claim.job_id,))
            raise PermanentError(f"duplicate effect for job {claim.job_id}") from None
        except (ServiceUnavailableError, psycopg.OperationalError):
            time.sleep(0.5)
    raise ServiceUnavailableError("the ledger stayed out of reach")
