"""Celery's remote control, with ``revoke`` made durable by the job ledger.

Celery's ``revoke`` only broadcasts: each worker keeps the id in an in-memory set and drops
the message when it sees it. On this platform the reconciler re-publishes a job that is still
``queued`` in the ledger, so a revoked job went round in a loop and ran as soon as a worker
restarted with an empty set. Here ``app.control.revoke`` (and so ``AsyncResult.revoke()``,
``celery control revoke`` and Flower's revoke, which all call it) first cancels each job in
the ledger (:meth:`Ledger.cancel`: a job not started ends ``cancelled`` and is never claimed;
a running one is marked ``cancel_requested``, which its claim, retry, reap and worker-loss
paths honour), then broadcasts as Celery does, so that with ``terminate=True`` the running
process is signalled too. Selected by the app's ``control_cls``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from billiard.common import TERM_SIGNAME
from celery.app.control import Control as CeleryControl

from synth_workers.platform import find_platform, platform_of

if TYPE_CHECKING:
    from synth_workers.platform import Platform

log = logging.getLogger(__name__)


def _ids(task_id: str | Iterable[str]) -> list[str]:
    """Celery takes one id or a list of ids; anything else is refused with a TypeError."""
    ids = [task_id] if isinstance(task_id, str) else list(task_id)
    wrong = [one for one in ids if not isinstance(one, str)]
    if wrong:
        raise TypeError(f"revoke takes task ids (str) or a list of them, got {wrong[0]!r}")
    return ids


def _is_job_id(task_id: str) -> bool:
    """Whether ``task_id`` can be a ledger job (a UUID); another id belongs to a message sent
    around the platform with an id of its own, which only the workers' revoked set knows."""
    try:
        uuid.UUID(task_id)
    except ValueError:
        return False
    return True


class Control(CeleryControl):
    """``app.control`` of the platform's apps."""

    def revoke(
        self,
        task_id: str | Iterable[str],
        destination: Any = None,
        terminate: bool = False,
        signal: str = TERM_SIGNAME,
        **kwargs: Any,
    ) -> Any:
        """Cancel the jobs in the ledger (durably: never run, whatever restarts), then tell
        the workers as Celery does (``terminate=True`` also signals a running job's process).

        Returns what Celery's ``revoke`` returns (the replies when ``reply=True``). A
        ledger that cannot be reached raises :class:`ServiceUnavailableError` before anything
        is broadcast: a revoke that only lived in worker memory would not hold. An id that
        is not a UUID (no ledger job can have it) is only broadcast; one that is not a str is
        refused with a :class:`TypeError`.
        """
        ids = _ids(task_id)
        ledger = platform_of(self.app).ledger
        for job_id in filter(_is_job_id, ids):
            outcome = ledger.cancel(job_id)
            log.info("revoke %s: %s in the ledger", job_id, outcome)
        return super().revoke(
            ids if len(ids) != 1 else ids[0],
            destination=destination,
            terminate=terminate,
            signal=signal,
            **kwargs,
        )


def on_task_revoked(sender: Any = None, request: Any = None, **kwargs: Any) -> None:
    """``task_revoked`` in a platform worker: a revoke broadcast by a client that did not
    cancel in the ledger first (a plain Celery app, an older client) still cancels the job
    there, so that it holds after the worker restarts (its revoked set is memory)."""
    platform: Platform | None = find_platform(getattr(sender, "app", None))
    job_id = getattr(request, "id", None)
    if platform is None or not isinstance(job_id, str) or not _is_job_id(job_id):
        return
    try:
        outcome = platform.ledger.cancel(job_id)
    except Exception:  # the worker's loop goes on; the revoke broadcast still applies
        log.exception("job %s revoked, but the ledger could not be told", job_id)
        return
    log.debug("job %s revoked: %s in the ledger", job_id, outcome)
