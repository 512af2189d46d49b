"""The ledger as Celery's result backend: ``AsyncResult``, ``delay().get()``, groups and chords
answered from the job ledger.

:class:`LedgerBackend` is Celery's Redis result backend with its reads and chord counting
moved to the ledger:

- **Reads** (``AsyncResult.state``/``get``/``result``/``traceback``, ``GroupResult``'s
  ``mget``) come from the job's ledger row, mapped to Celery's states: ``scheduled``/
  ``queued`` → PENDING, ``running`` → STARTED, ``failed-retrying`` → RETRY, ``succeeded`` →
  SUCCESS, ``dead`` → FAILURE (the original exception, rebuilt the way Celery rebuilds one:
  ``exception_to_python`` from type, module and arguments), ``cancelled`` → REVOKED. An id
  the ledger does not hold is read from Redis as Celery would (results Celery stored itself,
  e.g. a chord callback failed by its header) and is PENDING when absent there too.
- **No second copy**: a job run by the platform's Task (its request carries the claim) has
  its state in the ledger, so ``store_result`` writes nothing to Redis for it.
- **Waking waiters** stays Celery's pub/sub: :class:`ResultAnnouncer`, a lifecycle listener,
  PUBLISHes a small notice on the job's ``celery-task-meta-<id>`` channel once a final state
  has *committed* (one PUBLISH per job, batched from a thread); a waiter's consumer then reads
  the row. A waiter subscribes before it reads, so a job that finished before it subscribed is
  still seen.
- **Chords** are counted in the ledger (``synth_workers.ledger.results``), once per header
  part job however often it runs, and the callback's job row is written in the same
  transaction that marks the chord fired. ``GroupResult.save``/``restore`` stay on Redis.

``app.conf.result_backend`` keeps its ``redis://`` URL (the Redis notices are published to);
the class is chosen through the app's ``backend_cls``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from celery import states
from celery.app.task import Context
from celery.backends import redis as celery_redis
from celery.canvas import maybe_signature
from celery.exceptions import ChordError
from celery.result import GroupResult, ResultSet
from celery.utils.functional import _regen  # type: ignore[attr-defined]

from synth_workers.ledger.results import (
    ChordPart,
    add_to_chord,
    chord_of,
    mark_waited,
    read_results,
    record_chord,
    record_chord_part,
    set_chord_size,
)
from synth_workers.outbox import outbox
from synth_workers.platform import find_platform
from synth_workers.resultconsumer import ResultConsumer
from synth_workers.resultmeta import stored_meta

if TYPE_CHECKING:
    import psycopg
    from celery import Celery

    from synth_workers.ledger.store import Ledger

log = logging.getLogger(__name__)

# Celery's Redis backend and its consumer, untyped in celery's stubs (partly missing there).
_RedisBackend: Any = celery_redis.RedisBackend
_SentinelBackend: Any = celery_redis.SentinelBackend

#: The class Celery resolves for a platform app (``app.backend_cls``).
BACKEND_CLASS = "synth_workers.backend:LedgerBackend"


class LedgerBackend(_RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend reading states and results from the job ledger."""

    ResultConsumer = ResultConsumer

    def __new__(
        cls, *args: Any, url: str | None = None, app: Celery | None = None, **kwargs: Any
    ) -> Any:
        """A ``sentinel://`` result backend URL (Redis Sentinel: the master found through the
        sentinels, ``result_backend_transport_options``' ``master_name``) gives the Sentinel
        flavour, :class:`LedgerSentinelBackend`."""
        configured = url or (app.conf.result_backend if app is not None else None)
        chosen = cls
        if cls is LedgerBackend and str(configured or "").startswith("sentinel://"):
            chosen = LedgerSentinelBackend
        return super().__new__(chosen)

    def __init__(
        self, *args: Any, url: str | None = None, app: Celery | None = None, **kwargs: Any
    ) -> None:
        if url is None and app is not None:
            # Chosen through ``backend_cls``: the Redis URL is ``result_backend``'s.
            configured = app.conf.result_backend
            if isinstance(configured, str) and "://" in configured:
                url = configured
        super().__init__(*args, url=url, app=app, **kwargs)
        #: Jobs noted as waited on, not yet written to the ledger (see :meth:`flush_waits`).
        self._unmarked: set[str] = set()
        self._waits_lock = threading.Lock()

    @property
    def ledger(self) -> Ledger | None:
        """The app's ledger (``None`` for an app without one: plain Redis backend then)."""
        platform = find_platform(self.app)
        return None if platform is None else platform.ledger

    # --- reads -------------------------------------------------------------------------------
    def _meta(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row's meta, or PENDING with no result for a job whose result is ignored (its
        message's ``ignore_result``, else its task's), as Celery's backend, which stored
        nothing for it, answers. The ledger keeps the job's outcome all the same."""
        ignored = row.get("ignore_result")
        if ignored is None:
            task = self.app.tasks.get(row.get("task") or "")
            ignored = bool(getattr(task, "ignore_result", False))
        if ignored:
            return {"task_id": str(row["id"]), "status": states.PENDING, "result": None,
                    "traceback": None, "children": []}  # fmt: skip
        return stored_meta(row)

    def _get_task_meta_for(self, task_id: str) -> dict[str, Any]:
        ledger = self.ledger
        if ledger is not None:
            row = read_results(ledger, [task_id]).get(str(task_id))
            if row is not None:
                return self.meta_from_decoded(self._meta(row))  # type: ignore[no-any-return]
        return super()._get_task_meta_for(task_id)  # type: ignore[no-any-return]

    def mget(self, keys: Iterable[Any]) -> list[Any]:
        """Encoded metas of ``keys`` (task keys), from the ledger where it holds the job,
        else from Redis (what Celery stored there itself)."""
        keys = list(keys)
        ledger = self.ledger
        if ledger is None:
            return super().mget(keys)  # type: ignore[no-any-return]
        ids = [self._strip_prefix(key) for key in keys]
        rows = read_results(ledger, ids)
        missing = [key for key, job_id in zip(keys, ids, strict=True) if job_id not in rows]
        stored = dict(zip(missing, super().mget(missing), strict=True)) if missing else {}
        return [
            self.encode(self._meta(rows[job_id])) if job_id in rows else stored[key]
            for key, job_id in zip(keys, ids, strict=True)
        ]

    # --- waiting -----------------------------------------------------------------------------
    def _add_pending_result(self, task_id: str, result: Any, weak: bool = False) -> None:
        """Celery subscribes to the job's channel (``get()``, ``then()``, and every member
        of a ``GroupResult`` as it is built); the job is noted as waited on, and the notes
        are written to the ledger in one statement before anything waits
        (:meth:`flush_waits`): only a waited-on job's success is announced (see
        :class:`~synth_workers.announce.ResultAnnouncer`). Marked, subscribed, then read
        (Celery's ``on_wait_for_pending``): a job that finished before the mark is read as
        finished; one that finishes after it is announced."""
        if self.ledger is not None:
            with self._waits_lock:
                self._unmarked.add(task_id)
        super()._add_pending_result(task_id, result, weak=weak)

    def flush_waits(self) -> None:
        """Write the waits noted since the last flush (one statement; none when empty)."""
        ledger = self.ledger
        if ledger is None or not self._unmarked:
            return
        with self._waits_lock:
            ids, self._unmarked = self._unmarked, set()
        try:
            mark_waited(ledger, ids)
        except BaseException:
            with self._waits_lock:
                self._unmarked |= ids  # written by the next flush
            raise

    # --- writes ------------------------------------------------------------------------------
    def on_task_call(self, producer: Any, task_id: str) -> None:
        """Subscribe to nothing at send time. Celery's Redis backend subscribes the producer
        to every job's channel as it sends it (a Redis command per enqueue, and a
        subscription kept for each job nobody waits on); here ``get()`` / ``then()``
        subscribe (``add_pending_result``) and then read the ledger row, so a job that
        finished before the subscription is still seen."""

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        """A job the platform ran keeps its state in the ledger: nothing is written to Redis
        for it, also when the worker's main process reports it. Anything else (a result
        Celery stores for an id with no job, e.g. a chord callback failed by its header) is
        stored by Celery's Redis backend."""
        if request is not None and getattr(request, "synth_claim", None) is not None:
            return self.encode_result(result, state)
        ledger = self.ledger
        if ledger is not None and read_results(ledger, [task_id]):
            # A job of the ledger whose outcome the worker's main process reports (a hard
            # time limit, a lost process): the ledger decides (retry or not) and says so.
            if state == states.REVOKED:
                # Discarded unstarted (revoked by id or stamped header, expired): cancelled
                # now, before Celery counts it as a chord part, so that whoever sees the
                # chord fail finds this part REVOKED (``get()`` re-raises a parent's error)
                try:
                    ledger.cancel(task_id)
                except Exception:  # Postgres away: task_revoked's handler cancels it again
                    log.warning("job %s revoked, the ledger not told yet", task_id, exc_info=True)
            return self.encode_result(result, state)
        return super().store_result(task_id, result, state, traceback, request, **kwargs)

    def mark_as_done(
        self,
        task_id: str,
        result: Any,
        request: Any = None,
        store_result: bool = True,
        state: str = states.SUCCESS,
    ) -> None:
        super().mark_as_done(task_id, result, request, store_result, state)
        self._rerun_chord_part(request, state, result)

    def mark_as_failure(
        self,
        task_id: str,
        exc: Any,
        traceback: Any = None,
        request: Any = None,
        store_result: bool = True,
        call_errbacks: bool = True,
        state: str = states.FAILURE,
    ) -> None:
        super().mark_as_failure(
            task_id, exc, traceback, request, store_result, call_errbacks, state
        )
        self._rerun_chord_part(request, state, exc)

    # --- chords ------------------------------------------------------------------------------
    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        """Celery's, plus the chord's callback and part jobs recorded in the ledger (see
        :meth:`_rerun_chord_part`). A header given as a generator is not recorded."""
        super().apply_chord(header_result_args, body, **kwargs)
        ledger = self.ledger
        group_id, results = header_result_args[0], header_result_args[1]
        if ledger is None or not isinstance(results, (list, tuple)) or isinstance(results, _regen):
            return  # a generator header (Celery's lazy _regen list) is applied part by part
        record_chord(ledger, str(group_id), dict(body), [str(r.id) for r in results])

    def _rerun_chord_part(self, request: Any, state: str, result: Any) -> None:
        """A job that ran again from a message without its chord (the reaper or reconciler
        re-published only its task and arguments) is still counted as its chord's part.
        Looked up only for a run after the first attempt (the first carries its chord)."""
        ledger = self.ledger
        claim = getattr(request, "synth_claim", None)
        if ledger is None or claim is None or claim.attempt <= 1 or request.chord:
            return
        found = chord_of(ledger, str(request.id))
        if found is None or found[2] is None:
            return
        group_id, index, callback = found
        part = Context({"id": request.id, "group": group_id, "group_index": index})
        part.chord = callback
        self.on_chord_part_return(part, state, result)

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        ledger = self.ledger
        if ledger is None:
            super().set_chord_size(group_id, chord_size)
            return
        set_chord_size(ledger, group_id, int(chord_size))

    def add_to_chord(self, group_id: str, result: Any) -> None:
        ledger = self.ledger
        if ledger is None:
            super().add_to_chord(group_id, result)
            return
        add_to_chord(ledger, group_id)

    def _header_results(self, group_id: str, parts: Sequence[ChordPart]) -> list[Any]:
        """The body's argument: the parts' results in header order, nested as the header's
        ``GroupResult`` is where Celery saved it (``apply_chord`` saves a header holding
        groups, e.g. a chain ending in a group), flat otherwise, as Celery's Redis backend
        passes them."""
        flat = [p.result for p in parts]
        try:
            header = GroupResult.restore(group_id, app=self.app, backend=self)
        except Exception:  # a header Celery did not save, or one that cannot be read back
            log.debug("chord %s: no saved header structure", group_id, exc_info=True)
            return flat
        if header is None:
            return flat
        by_id = {p.job_id: p.result for p in parts}

        def nested(results: Iterable[Any] | None) -> list[Any]:
            return [
                nested(r.results) if isinstance(r, ResultSet) else by_id[str(r.id)]
                for r in results or ()
            ]

        try:
            return nested(header.results)
        except KeyError:  # a part counted that the saved structure does not name
            return flat

    def on_chord_part_return(
        self, request: Any, state: str, result: Any, propagate: Any = None, **kwargs: Any
    ) -> Any:
        """Count this header part in the ledger; the part that completes the chord enqueues
        the callback (outbox, same transaction) with the parts' results in header order, or,
        when a part failed, fails the callback as Celery does (``chord_error_from_stack``)."""
        ledger = self.ledger
        if ledger is None:
            return super().on_chord_part_return(request, state, result, propagate, **kwargs)
        job_id, group_id = request.id, request.group
        if not group_id or not job_id:
            return None
        callback: Any = maybe_signature(request.chord, app=self.app)

        def fire(conn: psycopg.Connection[Any], parts: Sequence[ChordPart]) -> str | None:
            results = self._header_results(str(group_id), parts)
            with outbox(conn):  # the callback (a group's members too) in this transaction
                sent = callback.apply_async((results,))
            return str(sent.id)

        parts = record_chord_part(
            ledger,
            str(group_id),
            str(job_id),
            request.group_index,
            state,
            self.encode_result(result, state),
            fire,
            frozenset(states.PROPAGATE_STATES),
        )
        if parts is None:
            return None
        failed = next((p for p in parts if p.state in states.PROPAGATE_STATES), None)
        if failed is None:
            return None
        exc = self.exception_to_python(failed.result)
        try:  # raised, as Celery's Redis backend does: chord_error_from_stack reads the stack
            # (a revoked part is counted with no exception in flight); the part's own error
            # is its cause, which a group body's members are failed with, as in Celery
            raise ChordError(f"Dependency {failed.job_id} raised {exc!r}") from (
                exc if isinstance(exc, Exception) else None
            )
        except ChordError as error:
            return self.chord_error_from_stack(callback, error)


class LedgerSentinelBackend(LedgerBackend, _SentinelBackend):  # type: ignore[misc]
    """:class:`LedgerBackend` on Redis Sentinel: Celery's Sentinel pool (its pub/sub
    consumer reconnects to the master the sentinels name after a failover)."""
