"""What a pool call's failure says: billiard's ``ExceptionInfo`` wraps the exception of a pool
call in ``ExceptionWithTraceback``; ``synth_workers.poolwatch`` unwraps it, so a pool
process's death (``WorkerLostError``, ``Terminated``) is recognized as Celery recognizes it;
and a pool process whose exit the event loop never heard is joined by the backstop.
(The end-to-end proof is the poison-pill tests: their losses are counted by the worker's main
process, ``error_class`` ``WorkerLostError``, not by the reaper.)"""

from __future__ import annotations

import os
import time
from typing import Any

from billiard import Process
from billiard.einfo import ExceptionInfo
from billiard.exceptions import Terminated, WorkerLostError
from billiard.pool import CLOSE, RUN

from synth_workers.poolwatch import Backstop, exception_of, process_lost


def _info(exc: BaseException) -> ExceptionInfo:
    try:
        raise exc
    except BaseException:
        return ExceptionInfo()


def test_billiard_wraps_the_exception_and_it_is_unwrapped() -> None:
    info = _info(WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL)"))
    assert not isinstance(info.exception, WorkerLostError)  # what billiard hands over
    assert isinstance(exception_of(info), WorkerLostError)
    assert process_lost(info)


def test_a_terminated_process_is_lost_and_a_task_error_is_not() -> None:
    assert process_lost(_info(Terminated(9)))
    failed = _info(ValueError("the task's own error"))
    assert isinstance(exception_of(failed), ValueError)
    assert not process_lost(failed)
    assert exception_of(object()) is None


class _Pool:
    """What :class:`Backstop` reads of billiard's pool: its processes, and the join."""

    def __init__(self, procs: list[Any]) -> None:
        self._pool = procs
        self._state = RUN
        self.joins = 0

    def maintain_pool(self) -> None:
        self.joins += 1
        self._pool = [p for p in self._pool if p.exitcode is None]


def test_the_backstop_joins_a_process_that_exited_unheard() -> None:
    alive = Process(target=time.sleep, args=(30,))
    dead = Process(target=os._exit, args=(9,))
    alive.start()
    dead.start()
    try:
        dead.join(10)  # exited; no sentinel was watched for it
        assert dead.exitcode == 9
        pool = _Pool([alive, dead])
        backstop = Backstop(pool)
        backstop()  # first sighting: the event loop may not yet have run its reader
        assert pool.joins == 0
        backstop()  # second: a whole period unheard, so billiard is asked to join it
        assert pool.joins == 1 and pool._pool == [alive]
        backstop()
        assert pool.joins == 1  # a living process is never a reason to join
        alive.terminate()
        alive.join(10)
        pool._state = CLOSE  # the pool closing: billiard joins its processes itself
        backstop()
        backstop()
        assert pool.joins == 1 and pool._pool == [alive]
    finally:
        alive.terminate()
        alive.join(10)
