"""Refused messages are dead-lettered in batches, off the worker's consuming loop.

The consumer (``synth_workers.consumer``) screens a message, acknowledges a refused one at
once (it is never put back on a queue) and hands it here; a thread writes what gathered every
``linger`` seconds in one multi-row statement. So a flood of bad messages costs the consuming
loop the screening alone, not a Postgres round trip each, and good jobs keep flowing.

While Postgres cannot be reached the refusals are kept (up to ``max_pending``, the oldest
dropped first, with an error logged) and retried. Like a message a worker has taken but not
started, a refusal still waiting here is lost if the worker is killed outright (at most the
last ``linger`` seconds' worth); a warm shutdown writes them (:meth:`RefusalWriter.flush`).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from synth_workers.batchwriter import BatchWriter
from synth_workers.errors import ServiceUnavailableError

if TYPE_CHECKING:
    from synth_workers.ledger.store import Ledger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    """One refused message, as the ledger keeps it."""

    job_id: str | None
    task: str
    queue: str
    raw: str  # the message's first bytes, as text (``screening.stored_text``)
    reason: str
    detail: str


class RefusalWriter(BatchWriter[Refusal]):
    """Writes refusals to the ledger from a background thread, many per statement."""

    name = "synth-refusal-writer"

    def __init__(self, ledger: Ledger, *, linger: float = 0.01, max_pending: int = 100_000) -> None:
        self.ledger = ledger
        super().__init__(linger=linger, max_pending=max_pending)

    def write_batch(self, batch: list[Refusal]) -> None:
        self.ledger.record_rejected_many(batch)
        _log_batch(batch)

    def kept(self, exc: Exception) -> bool:
        return isinstance(exc, ServiceUnavailableError)  # Postgres is back soon: retry

    def failed(self, batch: list[Refusal], exc: Exception) -> None:
        """A batch that failed for a reason of its own: write each alone, drop a bad one."""
        log.error("dead-lettering %d refused messages failed (%r); one by one", len(batch), exc)
        for refusal in batch:
            try:
                self.write_batch([refusal])
            except Exception:
                self.dropped += 1
                log.exception("refused message %s could not be recorded; dropped", refusal)


def _log_batch(batch: list[Refusal]) -> None:
    """One line per batch (a flood of bad messages must not flood the logs), the messages'
    ids and details at DEBUG."""
    reasons = collections.Counter(r.reason for r in batch)
    log.warning(
        "dead-lettered %d refused message(s) (failure class rejected_message): %s",
        len(batch),
        ", ".join(f"{reason} {n}" for reason, n in reasons.most_common()),
    )
    if log.isEnabledFor(logging.DEBUG):
        for r in batch:
            log.debug(
                "refused %s (task %s, queue %s): %s: %s",
                r.job_id,
                r.task,
                r.queue,
                r.reason,
                r.detail,
            )
