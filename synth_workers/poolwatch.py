"""How the worker's main process hears that a pool process died, and what it died of.

**A missed exit.** Celery's prefork pool (``AsynPool``) watches each pool process's sentinel
pipe; when it reads as closed, ``_event_process_exit`` asks billiard to join the exited
processes. The pipe closes as the dying process's files are closed, a moment *before* the
kernel makes the process waitable; when the event loop was idle it wakes inside that moment,
billiard sees the process still running, and the sentinel is no longer watched. The death is
then noticed by the pool's maintenance timer, up to 5 s later. Meanwhile the jobs of that
process keep their leases; with a lease shorter than that (plus ``SYNTH_LEASE_GRACE``) the
reaper takes them back before the main process hands them back itself, counting a worker
loss against each, and a batch's jobs (``synth_workers.batched``) lose their "run alone"
mark. :class:`PoolExitStep` polls such a process until it is waitable (a few milliseconds,
on the event loop's timer) and asks billiard again.

**A sentinel never heard.** A clean-clone CI run once saw the third death of a poison-pill
test go unnoticed for four seconds with neither the exit nor the warning below logged: the
sentinel's event never reached the loop, or the loop was held that long (which, was not
found). For the first case the step also looks at every pool process every
:data:`BACKSTOP_SECONDS` (one ``waitpid`` each); one found exited at two looks in a row (the
sentinel had a whole period to be heard) is joined, and a warning says so.

**What it died of.** billiard wraps the exception of a pool call in
:class:`~billiard.einfo.ExceptionWithTraceback`; :func:`exception_of` unwraps it (Celery's own
``Request.on_failure`` does the same).
"""

from __future__ import annotations

import logging
from typing import Any

from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]  # not in its stubs
from billiard.exceptions import Terminated, WorkerLostError
from billiard.pool import RUN
from celery import bootsteps

log = logging.getLogger(__name__)

#: Seconds between two looks at a process whose sentinel closed, and how many looks.
RECHECK_SECONDS = 0.005
RECHECK_TRIES = 200
#: Seconds between two looks at every pool process, whatever their sentinels said.
BACKSTOP_SECONDS = 0.25


def exception_of(einfo: Any) -> BaseException | None:
    """The exception an :class:`~billiard.einfo.ExceptionInfo` carries, unwrapped."""
    exc = getattr(einfo, "exception", None)
    if isinstance(exc, ExceptionWithTraceback):
        exc = exc.exc
    return exc if isinstance(exc, BaseException) else None


def process_lost(einfo: Any) -> bool:
    """Whether ``einfo`` says the pool process running the call died (or was terminated)."""
    return isinstance(exception_of(einfo), (WorkerLostError, Terminated))


class PoolExitStep(bootsteps.StartStopStep):
    """Makes the prefork pool notice every pool process's exit at once (see the module)."""

    requires = ("celery.worker.components:Pool", "celery.worker.components:Hub")

    def start(self, parent: Any) -> None:
        pool = getattr(getattr(parent, "pool", None), "_pool", None)
        hub = getattr(parent, "hub", None)
        original = getattr(pool, "_event_process_exit", None)
        if pool is None or hub is None or original is None:
            return  # not the prefork pool on an event loop: nothing to mend

        def on_exit(hub: Any, proc: Any) -> None:
            original(hub, proc)
            if proc.exitcode is None:  # not yet waitable: billiard kept it as running
                _recheck(hub, pool, proc, RECHECK_TRIES)

        # Bound before the pool registers with the event loop (the consumer's start), so
        # every process's sentinel reader, first ones included, calls it.
        pool._event_process_exit = on_exit
        hub.call_repeatedly(BACKSTOP_SECONDS, Backstop(pool))


class Backstop:
    """Joins the pool processes whose exit no sentinel reported (see the module)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.seen: set[int] = set()  # pids found exited at the last look

    def __call__(self) -> None:
        if not _running(self.pool):  # closing: its processes exit, billiard joins them
            self.seen = set()
            return
        exited = {proc.pid for proc in list(self.pool._pool) if proc.exitcode is not None}
        unheard = exited & self.seen
        self.seen = exited - unheard
        if unheard:
            log.warning(
                "pool process(es) %s exited unheard by the event loop: joining them now",
                ", ".join(str(pid) for pid in sorted(unheard)),
            )
            self.pool.maintain_pool()


def _running(pool: Any) -> bool:
    """Whether billiard would maintain ``pool`` now (what ``Pool.maintain_pool`` checks)."""
    handler = getattr(pool, "_worker_handler", None)
    return bool(pool._state == RUN and (handler is None or handler._state == RUN))


def _recheck(hub: Any, pool: Any, proc: Any, tries: int) -> None:
    def look() -> None:
        if proc.exitcode is not None:
            pool.maintain_pool()  # joins it: its jobs fail with WorkerLostError now
        elif tries > 1:
            _recheck(hub, pool, proc, tries - 1)
        else:  # a pool process that closed its sentinel and lives on: the timer has it
            log.warning("pool process %s closed its sentinel but has not exited", proc.pid)

    hub.call_later(RECHECK_SECONDS, look)
