"""The batched consumption mode for short jobs (``SYNTH_WORKER_MODE=batched``).

A prefork worker in this mode works in batches of up to ``SYNTH_BATCH_SIZE`` (N) messages:

- **Fetch** (:mod:`.pull`): after each blocking ``BRPOP`` the transport takes up to N - 1
  more messages in one round trip (a Lua script popping the queue's ten priority lists in
  priority order), so a batch is in strict priority order when it is taken.
- **Dispatch** (:mod:`.dispatch`): Celery builds its ``Request`` for every message as usual
  (screening, expiry, revokes, stats, events); their pool calls are collected and sent to
  one pool process as *one* call, whose results are handed back to each request (acks in
  memory, as in the default mode: ``synth_workers.broker``).
- **Run** (:mod:`.child`): the pool process claims every job of the batch in one ledger
  statement (which also completes its previous batch), runs each through Celery's own
  tracer (so ``runner.run`` keeps every rule: fencing, leases, retries, cancel, expiry,
  events), then gives back, in one statement, the claims of jobs it did not run.

**Priority window.** A job enqueued while batches are held waits for at most the jobs
already taken: ``concurrency x prefetch multiplier x N`` of lower priority can start after
it was enqueued, N per pool process (the default mode's window is ``concurrency x
prefetch``). The next fetch takes it first.

**Worker loss.** A pool process that dies mid-batch loses the batch: its unfinished jobs go
back to the queue without counting a worker loss and are marked to run alone next time, so a
poison pill is still dead-lettered after killing ``SYNTH_POISON_PILL_LOSSES`` processes,
and its batch-mates are not. A job with a time limit, or marked so, always runs alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synth_workers.settings import Settings

#: Broker transport option: messages per batch (absent: the default mode).
BATCH_OPTION = "synth_batch_size"
#: Message header: run this job alone (set on the jobs of a batch whose process died).
ALONE_HEADER = "synth_alone"


def batch_options(settings: Settings) -> dict[str, Any]:
    """The broker transport options of the mode (none in the default mode)."""
    if settings.worker_mode != "batched":
        return {}
    return {BATCH_OPTION: settings.batch_size}


__all__ = ["ALONE_HEADER", "BATCH_OPTION", "batch_options"]
