"""What a pool call's failure says: billiard's ``ExceptionInfo`` wraps the exception of a pool
call in ``ExceptionWithTraceback``; ``synth_workers.poolwatch`` unwraps it, so a pool
process's death (``WorkerLostError``, ``Terminated``) is recognized as Celery recognizes it.
(The end-to-end proof is the poison-pill tests: their losses are counted by the worker's main
process, ``error_class`` ``WorkerLostError``, not by the reaper.)"""

from __future__ import annotations

from billiard.einfo import ExceptionInfo
from billiard.exceptions import Terminated, WorkerLostError

from synth_workers.poolwatch import exception_of, process_lost


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
