"""A finished job's events move from Redis to the ledger, so Redis holds only live jobs.

Redis memory must not grow with throughput × retention: a job's own stream
(``synth:events:job:<id>``) is kept only while the job is live, plus ``SYNTH_EVENTS_GRACE``
seconds. The write script hands back a job's stream entries with its final event (one
round trip, the same atomic call that wrote it: nothing of the job is left out);
:class:`HistoryArchive`, a background writer, stores them in the ledger
(``synth_job_history``: one row per job, committed durably, many jobs per statement) and
only then shortens the stream's life to the grace, and only if nothing was added to it
since (a job replayed or told of late keeps its stream). Until the archive has stored a
job's events its stream keeps ``SYNTH_EVENTS_RETENTION``: an archive that cannot write
(Postgres away) loses nothing, it retries, and at worst the stream lives as long as it did
before.

Readers (:class:`~synth_workers.events.stream.Subscription`, ``JobHandle.events()``, the
SSE server) read the ledger's copy (:func:`ledger_history`) for whatever their cursor needs
that the stream no longer holds, then go on from Redis: the same ids, the same fields, so
``since`` and ``Last-Event-ID`` resume across the boundary with nothing missed or repeated.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis
from psycopg.errors import UndefinedTable

from synth_workers.batchwriter import BatchWriter
from synth_workers.errors import ServiceUnavailableError
from synth_workers.events.stream import Event, HistoryReader, as_text, id_key, job_stream
from synth_workers.ledger.history import HistoryRow, StoredEvent, events_after, store_events

if TYPE_CHECKING:
    from synth_workers.ledger.pool import LedgerPool

log = logging.getLogger(__name__)

#: One finished job as the write script hands it over: (job id, XRANGE of its stream).
Finished = tuple[str, Any]

# KEYS: job streams; ARGV[1]: grace seconds, ARGV[1 + n]: the last id archived of KEYS[n].
# A stream that got an event since it was archived keeps its TTL.
_SHORTEN = """
local shortened = 0
for n = 1, #KEYS do
  local last = redis.call('XREVRANGE', KEYS[n], '+', '-', 'COUNT', 1)[1]
  if last and last[1] == ARGV[n + 1] then
    redis.call('EXPIRE', KEYS[n], ARGV[1])
    shortened = shortened + 1
  end
end
return shortened
"""


def _events(entries: Sequence[Any], into: dict[tuple[int, int], StoredEvent]) -> None:
    """Adds a stream's entries to ``into``, keyed by their id (an event given twice, by two
    final events of one job in a batch, is kept once)."""
    for entry_id, flat in entries:
        ms, seq = id_key(as_text(entry_id))
        fields = {as_text(flat[k]): as_text(flat[k + 1]) for k in range(0, len(flat), 2)}
        fields.pop("job", None)  # the row's job_id
        into[ms, seq] = (ms, seq, fields)


def _is_uuid(job_id: str) -> bool:
    try:
        uuid.UUID(job_id)
    except ValueError:
        return False
    return True


class HistoryArchive(BatchWriter[Finished]):
    """Stores finished jobs' events in the ledger, then lets their Redis streams go."""

    name = "synth-events-archive"
    batch = 500

    def __init__(
        self, ledger: LedgerPool, client: redis.Redis, *, grace: int, linger: float = 0.25
    ) -> None:
        """``linger``: nothing waits on the archive (a stream keeps its retention until
        then), so it lets many jobs gather: one statement, commit and shortening per batch
        is what a job's share of them costs."""
        self.ledger = ledger
        self.client = client
        self.grace = grace
        self._shorten = client.register_script(_SHORTEN)
        super().__init__(linger=linger)

    def __call__(self, item: Finished) -> None:
        """Called by the writer for each final event; ids that cannot be ledger jobs (not
        UUIDs) are left to their stream's retention."""
        if _is_uuid(item[0]):
            self.add(item)

    def write_batch(self, batch: list[Finished]) -> None:
        jobs: dict[str, dict[tuple[int, int], StoredEvent]] = {}
        last: dict[str, str] = {}
        for job_id, entries in batch:
            if entries:
                _events(entries, jobs.setdefault(job_id, {}))
                last[job_stream(job_id)] = as_text(entries[-1][0])
        rows: list[HistoryRow] = [(job, [e[k] for k in sorted(e)]) for job, e in jobs.items()]
        store_events(self.ledger, rows)
        if last:
            self._shorten(keys=list(last), args=[self.grace, *last.values()])

    def failed(self, batch: list[Finished], exc: Exception) -> None:
        """Not stored: those streams keep ``SYNTH_EVENTS_RETENTION`` (nothing is lost)."""
        self.dropped += len(batch)
        hint = " (run `synth-workers db migrate`)" if isinstance(exc, UndefinedTable) else ""
        log.error("%s: %d job(s) not stored%s: %r", self.name, len(batch), hint, exc)

    def kept(self, exc: Exception) -> bool:
        """Postgres or Redis away: kept and retried (writing twice is harmless)."""
        return isinstance(exc, (ServiceUnavailableError, redis.ConnectionError, redis.TimeoutError))


def ledger_history(ledger: LedgerPool) -> HistoryReader:
    """Reads a job's stored events after a cursor (``[]`` for a cursor that is not an id)."""

    def read(job_id: str, cursor: str) -> list[Event]:
        try:
            canonical = str(uuid.UUID(job_id))
            after = id_key(cursor)
        except ValueError:
            return []
        try:
            found = events_after(ledger, job_id, after)
        except UndefinedTable:  # not migrated yet: nothing was stored
            log.warning("events: no synth_job_history table; run `synth-workers db migrate`")
            return []
        events = []
        for ms, seq, fields in found:
            raw = {k.encode(): str(v).encode() for k, v in fields.items()}
            raw[b"job"] = canonical.encode()
            events.append(Event.from_entry(f"{ms}-{seq}", raw))
        return events

    return read
