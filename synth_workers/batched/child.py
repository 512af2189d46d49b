"""The pool process's side of a batch: claim it in one statement, run each job through
Celery's own tracer, give back in one statement the claims of jobs it did not run.

:func:`run_batch` is what the worker's main process sends to a pool process (one call per
batch, :mod:`.dispatch`); :func:`take` is how ``runner.run`` finds a job's claim.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from billiard.einfo import ExceptionInfo
from celery._state import get_current_app

from synth_workers.ledger.batchclaim import claim_many, release
from synth_workers.platform import find_platform

if TYPE_CHECKING:
    from synth_workers.ledger.store import Claim
    from synth_workers.platform import Platform

log = logging.getLogger(__name__)


class _Held(threading.local):
    """The claims of the batch this thread runs, by job id (a pool process is forked from a
    main process that never claims: it starts with none)."""

    def __init__(self) -> None:
        self.claims: dict[str, Claim] = {}


_local = _Held()


class Failed:
    """A job of the batch whose tracer call itself raised (the pool would have handed the
    request the same :class:`ExceptionInfo`)."""

    def __init__(self, einfo: ExceptionInfo) -> None:
        self.einfo = einfo


Call = tuple[Callable[..., Any], tuple[Any, ...]]


def run_batch(calls: Sequence[Call]) -> list[Any]:
    """Run a batch in this pool process: ``calls`` are the tracer calls Celery would have
    sent one by one (``trace_task_ret``/``fast_trace_task`` and their arguments, the task id
    second). Returns each call's result (or :class:`Failed`), in order."""
    platform = find_platform(get_current_app())
    if platform is not None:
        claim_batch(platform, [str(args[1]) for _, args in calls])
    results: list[Any] = []
    try:
        for target, args in calls:
            try:
                results.append(target(*args))
            except Exception:
                results.append(Failed(ExceptionInfo()))
    finally:
        if platform is not None:
            release_unrun(platform)
    return results


def claim_batch(platform: Platform, ids: Sequence[str]) -> None:
    """Claim the queued jobs of ``ids`` in one statement that also writes this process's
    pending completions. Should it fail, each job is claimed alone when it runs."""
    keeper = platform.lease_keeper
    completer = platform.completer
    sent = keeper.before_claim()  # waits while cut off from the ledger (selffence)
    finished = completer.take()
    try:
        claims = claim_many(platform.ledger, ids, keeper.owner, finished)
    except Exception as exc:
        log.warning("batch claim of %d jobs failed (%s): claimed one by one", len(ids), exc)
        completer.write(finished)
        return
    completer.written(finished)
    for claim in claims:
        keeper.add(claim.job_id, since=sent)  # renewed from now on, as a claimed job is
        _local.claims[claim.job_id] = claim


def take(platform: Platform, job_id: str) -> Claim | None:
    """The claim of ``job_id`` if its batch claimed it (``None`` otherwise: the default
    mode, a job the batch could not claim, or one cancelled since the claim, which ends
    ``cancelled`` here). The job starts now: ``started`` announced."""
    held = _local.claims
    if not held:
        return None
    claim = held.pop(job_id, None)
    if claim is None:
        return None
    keeper = platform.lease_keeper
    ledger = platform.ledger
    # The keeper goes on renewing it for the runner (its lease counted from the batch's
    # claim, for self-fencing), unless it was cancelled since the claim (lease renewal):
    if keeper.cancel_requested(job_id) and ledger.cancelled_while_running(claim):
        keeper.remove(job_id)
        return None  # the runner's own claim is then refused: not run
    ledger.announce_started(claim, at=time.time())
    return claim


def release_unrun(platform: Platform) -> None:
    """Give back the claims of the batch's jobs that were never run."""
    held = _local.claims
    if not held:
        return
    left = list(held.values())
    held.clear()
    try:
        release(platform.ledger, left)
    except Exception:
        # their leases lapse (the keeper stops renewing them) and the reaper takes them
        log.exception("giving back %d unrun claims failed", len(left))
    for claim in left:
        platform.lease_keeper.remove(claim.job_id)
