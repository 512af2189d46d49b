"""Group claim: the claims of a threads pool's job threads, made at the same moment, as one
statement (the batched mode's :func:`~synth_workers.ledger.batchclaim.claim_many`).

A job thread claims its job before running it (``synth_workers.runner``). Alone, it runs the
single claim (:meth:`Fencing.claim`) at once, as before (a prefork or solo pool process, whose
jobs run one at a time on its main thread, always does). While a claim is on the wire, the
claims of the threads that get their jobs meanwhile queue, and the next turn claims them all
in one statement, with every completion they carried (the group commit of
:mod:`synth_workers.providers.groupcall`). A GPU host's embedding worker (``-P threads
-c 128``) gets its jobs in bursts of a forward pass's size: one round trip, one commit and
one pooled connection per burst instead of one per job.

What a job gets is what the single claim gives it. A job the group statement did not claim
(its row locked by another transaction, which the group skips rather than waits for, or not
queued) is claimed alone by the same turn, so it ends as the single claim would have ended
it. Two deliveries of one job in one group: the first is claimed, the other one's single
claim then finds it running and refuses it. A failure is its owner's: the group statement's
failure is every caller's (nothing was claimed), a lone claim's only its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from synth_workers.ledger.batchclaim import claim_many
from synth_workers.providers.groupcall import GroupCall

if TYPE_CHECKING:
    from synth_workers.ledger.rows import Claim
    from synth_workers.ledger.store import Ledger

#: The most claims one statement carries.
LIMIT = 256

#: (job id, lease owner, the completions that ride along).
_Item = tuple[str, str, Sequence[tuple["Claim", Any]]]


class ClaimGroup:
    """One process's claims, grouped while one is on the wire (a new group after fork)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.pid = os.getpid()
        self._group: GroupCall[_Item, Claim | Exception | None] = GroupCall(
            self._claim, limit=LIMIT
        )

    @property
    def calls(self) -> int:
        """Claim statements made so far for more than one job or for one alone."""
        return self._group.calls

    def claim(
        self, job_id: str, owner: str, complete: Sequence[tuple[Claim, Any]] = ()
    ) -> Claim | None:
        """:meth:`Fencing.claim`'s answer for ``job_id``, the claim made with the claims of
        the other threads waiting meanwhile."""
        if threading.current_thread() is threading.main_thread():
            # a prefork or solo pool process: one job at a time, nothing to group with
            return self.ledger.claim(job_id, owner, complete=complete)
        outcome = self._group.call((job_id, owner, complete)).value
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _claim(self, items: Sequence[_Item]) -> list[Claim | Exception | None]:
        ledger = self.ledger
        if len(items) == 1:  # alone: the single claim, its errors raised to its caller
            job_id, owner, complete = items[0]
            return [ledger.claim(job_id, owner, complete=complete)]
        answered: dict[int, Claim] = {}
        owner = items[0][1]
        if all(item[1] == owner for item in items):  # one process: one lease owner
            done = [pair for item in items for pair in item[2]]
            claims = claim_many(ledger, [item[0] for item in items], owner, done)
            by_id = {claim.job_id: claim for claim in claims}
            for index, (job_id, _, _) in enumerate(items):
                claim = by_id.pop(job_id, None)  # a second delivery of it: claimed alone
                if claim is not None:
                    ledger.announce_started(claim)
                    answered[index] = claim
            items = [(job_id, item_owner, ()) for job_id, item_owner, _ in items]
        outcomes: list[Claim | Exception | None] = []
        for index, (job_id, item_owner, complete) in enumerate(items):
            if index in answered:
                outcomes.append(answered[index])
                continue
            try:
                outcomes.append(ledger.claim(job_id, item_owner, complete=complete))
            except Exception as exc:  # this job's own: the others were claimed
                outcomes.append(exc)
        return outcomes
