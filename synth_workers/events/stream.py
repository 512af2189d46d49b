"""Job events on Redis Streams: the writer (a lifecycle listener) and the event record
(readers: :mod:`synth_workers.events.subscription`, the SSE server).

Every :class:`~synth_workers.lifecycle.JobEvent` the ledger announces is written, in one
round trip (one Lua script call), to:

* ``synth:events:job:<job id>``: the job's own stream, its whole history while it lives.
  With an archive (:mod:`synth_workers.events.history`, what the app factory connects) the
  script hands the stream's entries back with the job's final event; once the archive has
  stored them in the ledger the stream expires ``SYNTH_EVENTS_GRACE`` seconds later, and
  readers take the history from the ledger. Without one (or until then) it expires
  ``SYNTH_EVENTS_RETENTION`` seconds after the final event; ``SYNTH_JOB_TTL`` after the last
  other event, as a safety net for a job that never ends;
* ``synth:events:all``: every job's events, capped at about ``SYNTH_EVENTS_MAXLEN`` entries;
* ``synth:events:user:<user id>``: the events of the user's jobs, capped the same way, expiring
  ``SYNTH_EVENTS_RETENTION`` seconds after its last event.

One event has **the same id in every stream** it is in: the id the global stream gives it,
which is monotonic over all jobs. So ``since=`` / ``Last-Event-ID`` work whatever stream is
read. An event without a user id (a state change announced by a sweeper) takes the user and
the correlation id (``synth_workers.correlation``) of its job's first event, read in the same
script.

Kinds are those of :mod:`synth_workers.lifecycle` plus ``failed`` (an attempt failed; written
just before the ``retrying`` or ``dead`` it leads to) and ``workflow_completed`` (announced by
a workflow task, see :meth:`synth_workers.task.Task.workflow_completed`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from synth_workers import liveness
from synth_workers.lifecycle import JobEvent
from synth_workers.redisconn import redis_client
from synth_workers.states import FINAL_KINDS

if TYPE_CHECKING:
    from synth_workers.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "synth:events:"
GLOBAL_STREAM = PREFIX + "all"
#: A job's own stream keeps at most about this many events (progress of a very long job).
JOB_STREAM_CAP = 10_000
#: ``data`` above this many bytes of JSON is replaced by ``{"truncated": true, "bytes": n}``.
DATA_LIMIT_BYTES = 4096
#: Kinds written as a ``failed`` event followed by themselves.
FAILURE_KINDS = frozenset({"retrying", "dead"})


#: Takes ``(job id, its stream's entries as XRANGE returns them)`` once the job's final
#: event is written (``HistoryArchive.add``).
Archive = Callable[[tuple[str, Any]], None]
#: ``(job id, after id) -> the job's events after that id`` from durable storage (the ledger).
HistoryReader = Callable[[str, str], "list[Event]"]


def id_key(event_id: str) -> tuple[int, int]:
    """An event id as a pair that orders like the ids do."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def job_stream(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def user_stream(user_id: str) -> str:
    return f"{PREFIX}user:{user_id}"


#: Separates an event's fields and values in the one argument that carries them (packing
#: every field as its own argument cost the worker more than the rest of the write).
SEP = "\x1f"

# KEYS[1]: the global stream. ARGV: global cap, job cap, job safety TTL, retention, user key
# prefix, job key prefix, archive (0/1), then per event: job id, user id ('' = none), final
# (0/1), and the field/value pairs joined by SEP. Returns the ids given, in order, and (with
# archive) for each final event its job id and its stream's entries.
_WRITE = """
local gcap, jcap, jttl, ret = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local uprefix, jprefix, archive = ARGV[5], ARGV[6], ARGV[7]
local ids = {}
local finished = {}
local i = 8
while i <= #ARGV do
  local job, user, final, packed = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local jkey = jprefix .. job
  local fields = {}
  local start = 1
  while true do
    local j = string.find(packed, '\\31', start, true)
    if not j then
      fields[#fields + 1] = string.sub(packed, start)
      break
    end
    fields[#fields + 1] = string.sub(packed, start, j - 1)
    start = j + 1
  end
  i = i + 4
  if user == '' then
    local first = redis.call('XRANGE', jkey, '-', '+', 'COUNT', 1)[1]
    if first then
      local f = first[2]
      local corr = false
      for k = 1, #fields, 2 do
        if fields[k] == 'corr' then corr = true break end
      end
      for k = 1, #f, 2 do
        if f[k] == 'user' then
          user = f[k + 1]
        elseif f[k] == 'corr' and not corr then
          fields[#fields + 1] = 'corr'
          fields[#fields + 1] = f[k + 1]
        end
      end
    end
    if user ~= '' then
      fields[#fields + 1] = 'user'
      fields[#fields + 1] = user
    end
  end
  local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', gcap, '*', unpack(fields))
  local ok = redis.pcall('XADD', jkey, 'MAXLEN', '~', jcap, id, unpack(fields))
  if type(ok) == 'table' and ok.err then
    redis.call('XADD', jkey, 'MAXLEN', '~', jcap, '*', unpack(fields))
  end
  if final == '1' then
    redis.call('EXPIRE', jkey, ret)
    if archive == '1' then
      finished[#finished + 1] = job
      finished[#finished + 1] = redis.call('XRANGE', jkey, '-', '+')
    end
  else
    redis.call('EXPIRE', jkey, jttl)
  end
  if user ~= '' then
    local ukey = uprefix .. user
    ok = redis.pcall('XADD', ukey, 'MAXLEN', '~', gcap, id, unpack(fields))
    if type(ok) == 'table' and ok.err then
      redis.call('XADD', ukey, 'MAXLEN', '~', gcap, '*', unpack(fields))
    end
    redis.call('EXPIRE', ukey, ret)
  end
  ids[#ids + 1] = id
end
return {ids, finished}
"""


@dataclass(frozen=True, slots=True)
class Event:
    """One job event as read back from a stream; ``id`` orders all events."""

    id: str
    kind: str
    job_id: str
    task: str | None = None
    queue: str | None = None
    attempt: int | None = None
    user_id: str | None = None
    #: Unix time of the change.
    at: float = 0.0
    data: Mapping[str, Any] = field(default_factory=dict)
    #: The request id the job carries (``synth_workers.correlation``).
    correlation_id: str | None = None

    @property
    def final(self) -> bool:
        """The job ended with this event (succeeded, dead or cancelled)."""
        return self.kind in FINAL_KINDS

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "job_id": self.job_id,
            "task": self.task,
            "queue": self.queue,
            "attempt": self.attempt,
            "user_id": self.user_id,
            "correlation_id": self.correlation_id,
            "at": self.at,
            "data": dict(self.data),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), separators=(",", ":"), default=str)

    @classmethod
    def from_entry(cls, entry_id: bytes | str, fields: Mapping[bytes, bytes]) -> Event:
        def text(name: bytes) -> str | None:
            value = fields.get(name)
            return None if value is None else value.decode()

        attempt = text(b"attempt")
        data = text(b"data")
        return cls(
            id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
            kind=text(b"kind") or "?",
            job_id=text(b"job") or "?",
            task=text(b"task"),
            queue=text(b"queue"),
            attempt=int(attempt) if attempt else None,
            user_id=text(b"user"),
            at=float(text(b"at") or 0.0),
            data=json.loads(data) if data else {},
            correlation_id=text(b"corr"),
        )


#: ``json.dumps(obj, separators=(",", ":"), default=str)`` with one encoder for every call.
_compact = json.JSONEncoder(separators=(",", ":"), default=str).encode


def encode_data(data: Mapping[str, Any]) -> str:
    text = _compact(dict(data))
    if len(text) > DATA_LIMIT_BYTES:
        return json.dumps({"truncated": True, "bytes": len(text)})
    return text


def _joined(fields: list[str]) -> str:
    """The fields joined by :data:`SEP`, a separator inside one made a space."""
    text = SEP.join(fields)
    if text.count(SEP) != len(fields) - 1:
        text = SEP.join(f.replace(SEP, " ") for f in fields)
    return text


#: Per :meth:`EventWriter.command` call: each ``data`` mapping's text, by its id (the mapping
#: kept with it, so the id is not reused within the call): a bulk send's events share one.
_Texts = dict[int, tuple[Mapping[str, Any], str]]


def _fields(
    kind: str, event: JobEvent, data: Mapping[str, Any], texts: _Texts | None = None
) -> list[str]:
    out = ["kind", kind, "job", event.job_id, "at", repr(event.at)]
    if event.task:
        out += ["task", event.task]
    if event.queue:
        out += ["queue", event.queue]
    if event.attempt is not None:
        out += ["attempt", str(event.attempt)]
    if event.user_id:
        out += ["user", str(event.user_id)]
    if event.correlation_id:
        out += ["corr", event.correlation_id]
    if data:
        if texts is None:
            out += ["data", encode_data(data)]
        else:
            kept = texts.get(id(data))
            if kept is None or kept[0] is not data:
                kept = texts[id(data)] = (data, encode_data(data))
            out += ["data", kept[1]]
    return out


class EventWriter:
    """Writes lifecycle events to Redis Streams; connect :meth:`__call__` to a Lifecycle.

    Runs in the thread that changed the job's state: one Redis round trip per event, and a
    Redis error is raised to the lifecycle hub (which logs it and never fails the job).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        retention: int,
        maxlen: int,
        job_ttl: int,
        archive: Archive | None = None,
    ) -> None:
        self.client = client
        self.retention = retention
        self.maxlen = maxlen
        self.job_ttl = job_ttl
        #: Handed ``(job id, stream entries)`` for each final event written (see
        #: :mod:`synth_workers.events.history`); ``None``: streams keep ``retention``.
        self.archive = archive
        self._script = client.register_script(_WRITE)

    def __call__(self, event: JobEvent) -> None:
        self.write([event])

    @staticmethod
    def _args(event: JobEvent, texts: _Texts | None = None) -> list[str]:
        entries: list[tuple[str, Mapping[str, Any]]] = []
        if event.kind in FAILURE_KINDS:
            failed = {k: v for k, v in event.data.items() if k in ("failure_class", "error_class")}
            entries.append(("failed", failed))
        entries.append((event.kind, event.data))
        args: list[str] = []
        for kind, data in entries:
            fields = _fields(kind, event, data, texts)
            args += [
                event.job_id,
                str(event.user_id or ""),
                "1" if kind in FINAL_KINDS else "0",
                _joined(fields),
            ]
        return args

    def write(self, events: Sequence[JobEvent]) -> list[str]:
        """Write ``events`` in one round trip; return the ids they were given."""
        keys, args = self.command(events)
        return self.written(self._script(keys=keys, args=args))

    def command(self, events: Sequence[JobEvent]) -> tuple[list[str], list[str]]:
        """The keys and arguments of the script call that writes ``events`` (a caller may
        send it in its own pipeline, as ``EVALSHA`` of :attr:`script_sha`, and hand the
        reply to :meth:`written`)."""
        args: list[str] = [
            str(self.maxlen),
            str(JOB_STREAM_CAP),
            str(self.job_ttl),
            str(self.retention),
            PREFIX + "user:",
            PREFIX + "job:",
            "0" if self.archive is None else "1",
        ]
        texts: _Texts = {}
        for event in events:
            args += self._args(event, texts)
        return [GLOBAL_STREAM], args

    @property
    def script_sha(self) -> str:
        return str(self._script.sha)

    def load_script(self) -> None:
        """Make sure Redis knows the write script (before sending it as ``EVALSHA``)."""
        self._script.registered_client.script_load(self._script.script)

    def written(self, reply: Any) -> list[str]:
        """The ids the script gave; finished jobs' entries it returned go to the archive."""
        ids, finished = reply
        if self.archive is not None:
            for n in range(0, len(finished), 2):
                self.archive((as_text(finished[n]), finished[n + 1]))
        return [as_text(i) for i in ids]


def as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def events_client(url: str | Settings, timeout: float = 5.0, blocking: float = 0.0) -> redis.Redis:
    """A client for the event streams (``url``: a Redis URL, or the settings, Sentinel
    included): ``timeout`` seconds to connect and for an answer (``SYNTH_REDIS_TIMEOUT``: a
    listener must not hang a job), plus ``blocking`` seconds for a reader whose XREAD blocks
    that long on the server."""
    return redis_client(
        url,
        socket_connect_timeout=timeout,
        socket_timeout=timeout + blocking,
        **liveness.redis_kwargs(),
    )
