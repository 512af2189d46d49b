"""The batch tier's loop: submit, recover, poll and apply (a thread in each worker's main
process, :class:`BatchTierStep`; any number of workers may run it at once).

Each tick (``SYNTH_BATCH_TICK``):

1. **Submit.** A (provider, model) whose waiting requests reach ``SYNTH_BATCH_MAX_ITEMS``, or
   whose oldest waited ``SYNTH_BATCH_MAX_AGE``, gets a batch, within its batch limits
   (``SYNTH_BATCH_LIMITS``: open requests and tokens from the ledger, batches per window from
   the quota governor; never the online quota). The *intent* (a ``submitting`` batch row and
   its items' custom ids) commits first; then the SDK sends it; then its provider id is
   recorded.
2. **Recover.** A ``submitting`` batch whose lease lapsed (its process died between the
   intent and the record) is looked up at the provider (OpenAI: by metadata; Anthropic: by
   custom ids) and recorded if found, sent (once) if not.
3. **Poll and apply.** An open batch is polled every ``SYNTH_BATCH_POLL_INTERVAL``; once ended,
   its results are written back in chunks, each in one transaction with the resumption of
   its jobs, guarded so that a chunk applied again writes nothing; what it did not answer
   (expired, cancelled) goes to the next batch, or online near the job's deadline.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from celery import bootsteps

from synth_workers.batchtier.api import BatchAPI, Results
from synth_workers.errors import ProviderRejectedError, ProviderUnavailableError
from synth_workers.ledger import batches as store
from synth_workers.limits import QuotaGovernor, Reservation
from synth_workers.platform import platform_of

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)
#: Seconds to wait after a failed tick.
FAILED_TICK_WAIT = 10.0


class BatchTier:
    """One process's batch tier: :meth:`tick` does one round of the steps above."""

    def __init__(self, app: Celery) -> None:
        platform = platform_of(app)
        self.ledger = platform.ledger
        self.settings = platform.settings
        self.batch = self.settings.batch
        self.quota = QuotaGovernor(platform.redis, window=self.settings.llm_quota_window)
        self._apis: dict[tuple[str, str], BatchAPI] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def api(self, provider: str, kind: str) -> BatchAPI:
        key = (provider, kind)
        if key not in self._apis:
            self._apis[key] = BatchAPI(self.settings, provider, kind)
        return self._apis[key]

    def tick(self) -> dict[str, int]:
        """One round; returns what it did (for logs, tests and the benchmark)."""
        return {
            "submitted": self.submit_due(),
            "recovered": self.recover(),
            "applied": self.poll(),
        }

    # --- 1. submit --------------------------------------------------------------------------
    def submit_due(self) -> int:
        sent = 0
        for provider, model, kind, waiting, age in store.waiting_groups(self.ledger):
            if waiting < self.batch.max_items and age < self.batch.max_age:
                continue
            limit = self.batch.limit(provider, model)
            room = self.batch.max_items
            token_room: int | None = None
            open_requests = 0
            if "requests" in limit or "tokens" in limit:
                open_requests, open_tokens = store.open_load(self.ledger, provider, model)
                if "requests" in limit:
                    room = min(room, limit["requests"] - open_requests)
                if "tokens" in limit:
                    token_room = limit["tokens"] - open_tokens
            if room <= 0 or (token_room is not None and token_room <= 0):
                continue  # the provider's batch queue is full: wait for a batch to end
            limiter = self.quota.batch_limiter(provider, model, limit.get("batches"))
            grant = limiter.try_reserve()
            if not isinstance(grant, Reservation):
                continue  # batches per window used up
            try:
                intent = store.record_intent(
                    self.ledger,
                    provider,
                    model,
                    kind,
                    room,
                    token_room,
                    self.batch.lease,
                    alone=open_requests == 0,
                )
                if intent is not None:
                    self._send(*intent)
                    sent += 1
            finally:
                grant.release()
        return sent

    def _send(self, batch: store.Batch, items: list[tuple[str, dict[str, Any]]]) -> None:
        try:
            provider_id, status = self.api(batch.provider, batch.kind).submit(batch.id, items)
        except ProviderRejectedError as exc:
            log.error("batch %s refused: %s", batch.id, exc)
            store.fail_all(self.ledger, batch.id, exc.status or 400, str(exc))
            store.set_state(self.ledger, batch.id, "ended", "refused")
            return
        except ProviderUnavailableError as exc:
            # it may have been created all the same: the recovery looks it up before sending
            log.warning("batch %s: %s; looked up and sent again later", batch.id, exc)
            store.set_state(self.ledger, batch.id, "submitting", None, self.batch.poll_interval)
            return
        store.record_submitted(self.ledger, batch.id, provider_id, status, self.batch.poll_interval)
        log.info("batch %s sent as %s (%d requests)", batch.id, provider_id, len(items))

    # --- 2. recover -------------------------------------------------------------------------
    def recover(self) -> int:
        recovered = 0
        for batch in store.take_due(self.ledger, ["submitting"], self.batch.lease):
            items = store.batch_items(self.ledger, batch.id)
            if not items:
                store.set_state(self.ledger, batch.id, "ended", "empty")
                continue
            api = self.api(batch.provider, batch.kind)
            try:
                found = api.find(
                    batch.id,
                    {c for c, _ in items},
                    batch.created_at,
                    store.known_provider_ids(self.ledger, batch.provider),
                )
            except ProviderUnavailableError:
                continue
            if found == "unknown":
                continue  # a batch that may be this one has not ended: look again later
            if found is not None:
                store.record_submitted(
                    self.ledger, batch.id, found, "recovered", self.batch.poll_interval
                )
                log.warning("batch %s found at the provider as %s", batch.id, found)
            else:
                self._send(batch, items)
            recovered += 1
        return recovered

    # --- 3. poll and apply ------------------------------------------------------------------
    def poll(self) -> int:
        applied = 0
        for batch in store.take_due(
            self.ledger, ["submitted", "applying"], self.batch.poll_interval
        ):
            assert batch.provider_batch_id is not None
            api = self.api(batch.provider, batch.kind)
            try:
                status, ended = api.status(batch.provider_batch_id)
                if not ended:
                    continue
                store.set_state(self.ledger, batch.id, "applying", status, self.batch.lease)
                results = api.results(batch.provider_batch_id)
            except (ProviderUnavailableError, ProviderRejectedError) as exc:
                log.warning("batch %s: %s; polled again later", batch.id, exc)
                continue
            applied += self.apply(batch, results)
            store.set_state(self.ledger, batch.id, "ended", status)
        return applied

    def apply(self, batch: store.Batch, results: Results) -> int:
        """Write an ended batch's results back and give back what it did not answer."""
        if results.refused is not None:
            return store.fail_all(self.ledger, batch.id, *results.refused)
        written = 0
        outcomes = [(c, b, True) for c, b in results.done] + [
            (c, b, False) for c, b in results.failed
        ]
        size = self.batch.apply_chunk
        for start in range(0, len(outcomes), size):
            chunk = outcomes[start : start + size]
            written += store.apply_outcomes(
                self.ledger,
                batch.id,
                [(c, b) for c, b, ok in chunk if ok],
                [(c, b) for c, b, ok in chunk if not ok],
            )
        again, online = store.give_back(
            self.ledger, batch.id, self.batch.deadline, self.batch.window
        )
        if again or online:
            log.warning(
                "batch %s left %d requests unanswered: %d to the next batch, %d online",
                batch.id,
                again + online,
                again,
                online,
            )
        return written

    # --- the thread -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="synth-batch-tier", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.batch.tick
            try:
                self.tick()
            except Exception:
                # Postgres or Redis out of reach, the ledger not migrated: say so, not every tick
                log.exception("batch tier tick failed; retrying in %.0fs", FAILED_TICK_WAIT)
                wait = max(wait, FAILED_TICK_WAIT)
            self._stop.wait(wait)


class BatchTierStep(bootsteps.StartStopStep):
    """Worker bootstep running the :class:`BatchTier` in the worker's main process."""

    label = "synth-batch-tier"
    #: After the pool forked (see :class:`synth_workers.ledger.sweeper.SweeperStep`).
    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tier: BatchTier | None = None

    def start(self, parent: Any) -> None:
        if platform_of(parent.app).settings.batch.enabled:
            self.tier = BatchTier(parent.app)
            self.tier.start()

    def stop(self, parent: Any) -> None:
        if self.tier is not None:
            self.tier.stop()

    def shutdown(self, parent: Any) -> None:
        self.stop(parent)
