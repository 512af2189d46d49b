"""The floor of a claim that overlaps Celery's hand-over to the pool (peer ``celery-overlap``).

``bench/raw_app.py``'s ``roundtrip`` is the floor of a worker that claims each job in its pool
process: the write starts only once the job has reached that process. Here the worker's
*main* process sends the same write as Celery builds the job's ``Request`` from the message,
on a non-blocking connection watched by the worker's event loop, while the job travels on to
a pool process. The answer is relayed to the process that runs the job, and the body waits
for it before it runs. :data:`RELAY` picks the relay: the job's id sent to a datagram socket
that process bound at start (the main process learns which process took the job from
Celery), or written into memory shared with every pool process, which the body polls.

Nothing of the platform's: it measures what the relay design could reach at best, so that
an issue's target can be judged against it (``bench/README.md``, peers).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import time
import zlib
from collections import deque
from typing import Any

from celery import signals
from celery.worker.request import Request

from bench.raw_app import ROUNDTRIP_CREATE, ROUNDTRIP_TABLE, app

#: One row per main-process connection (key ``-(pid * 16 + i)``), so that two writes in
#: flight never wait for each other's lock; the pool processes' own rows are positive pids.
_WRITE = (
    f"INSERT INTO {ROUNDTRIP_TABLE} VALUES ($1, 1) "  # noqa: S608 - a constant
    "ON CONFLICT (pid) DO UPDATE SET n = synth_bench_roundtrip.n + 1"
).encode()
#: Connections in the main process: as many writes in flight as pool processes
CONNECTIONS = int(os.environ.get("BENCH_OVERLAP_CONNECTIONS", "2"))
#: How long a body waits for its relayed answer before it fails
RELAY_TIMEOUT_S = 10.0
#: ``written``: to the pool process Celery has written the job to (``ApplyResult._write_to``,
#: set as the write starts), else as ``ack``; ``ack``: to the process that acknowledged the
#: job (``Request.on_accepted``: its acknowledgement travels to the main process first).
#: (Sending every answer to every pool process does not work: an idle process's datagram
#: queue fills, ``net.unix.max_dgram_qlen``, and the main process blocks.)
#: ``spin``: no datagram; the main process writes the job's id into memory it shares with the
#: pool processes (mapped before they fork), and the body polls it, yielding the GIL between
#: looks: no wake-up of either process on the relay's path, at the cost of a busy wait.
RELAY = os.environ.get("BENCH_OVERLAP_RELAY", "written")
#: ``spin``: slots of the shared memory (a job's id, 36 bytes, at its hash, probed onward;
#: with all of a job's slots taken the first is overwritten, and its body times out: the run
#: reports it)
_SLOT, _SLOTS, _PROBE = 36, 1 << 14, 8
_shared = mmap.mmap(-1, _SLOT * _SLOTS)  # before the pool forks: the worker imports this module
_EMPTY = bytes(_SLOT)


def _slots(job: bytes) -> list[int]:
    first = zlib.crc32(job) % _SLOTS
    return [((first + i) % _SLOTS) * _SLOT for i in range(_PROBE)]


def _address(pid: int) -> bytes:
    """The abstract datagram address pool process ``pid`` listens on."""
    return b"\0bench-overlap-%d" % pid


class _Link:
    """One non-blocking Postgres connection of the main process: one write in flight."""

    def __init__(self, relay: _Relay, index: int) -> None:
        import psycopg

        url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
        self.conn = psycopg.connect(url, autocommit=True, options="-c synchronous_commit=off")
        with contextlib.suppress(psycopg.errors.UniqueViolation):  # another peer's at once
            self.conn.execute(ROUNDTRIP_CREATE)
        self.pg = self.conn.pgconn
        self.key = str(-(os.getpid() * 16 + index)).encode()
        self.relay = relay
        self.job: str | None = None

    def send(self, job: str) -> None:
        self.job = job
        self.pg.send_query_params(_WRITE, [self.key])
        self.pg.flush()

    def readable(self) -> None:
        from psycopg import pq

        self.pg.consume_input()
        while self.job is not None and not self.pg.is_busy():
            result = self.pg.get_result()
            if result is None:  # the end of this write's results
                job, self.job = self.job, None
                self.relay.answered(self, job)
            elif result.status != pq.ExecStatus.COMMAND_OK:
                raise RuntimeError(result.error_message.decode())


class _Relay:
    """The main process's side: writes sent as requests go to the pool, answers relayed to the
    pool process that took each job, whichever comes first."""

    def __init__(self) -> None:
        from kombu.asynchronous.hub import get_event_loop

        hub = self.hub = get_event_loop()
        assert hub is not None, "celery-overlap needs the worker's event loop (prefork)"
        self.links = [_Link(self, i) for i in range(CONNECTIONS)]
        self.idle = deque(self.links)
        self.waiting: deque[str] = deque()  # jobs whose write waits for a free connection
        self.requests: dict[str, Request] = {}  # sent, not yet answered
        self.done: set[str] = set()  # answered, pool process not yet known
        self.taken: dict[str, int] = {}  # pool process known, not yet answered
        self.told: dict[str, int] = {}  # answered before Celery said which process took it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        for link in self.links:
            hub.add_reader(link.pg.socket, link.readable)

    def send(self, job: str, request: Request) -> None:
        self.requests[job] = request
        if self.idle:
            self.idle.popleft().send(job)
        else:
            self.waiting.append(job)

    def answered(self, link: _Link, job: str) -> None:
        if self.waiting:
            link.send(self.waiting.popleft())
        else:
            self.idle.append(link)
        request = self.requests.pop(job)
        if RELAY == "spin":
            key = job.encode()
            slots = _slots(key)
            at = next((i for i in slots if _shared[i : i + _SLOT] == _EMPTY), slots[0])
            _shared[at : at + _SLOT] = key
            return
        pid = self.taken.pop(job, None)
        if pid is not None:
            self._tell(job, pid)
        elif RELAY == "written" and self._written(job, request):
            return
        else:
            self.done.add(job)
            if RELAY == "written":
                # Celery writes jobs to the pool after the event loop's other callbacks of
                # the same poll (``schedule_writes``): look again before the next poll
                self.hub.call_soon(self._written, job, request, True)

    def _written(self, job: str, request: Request, again: bool = False) -> bool:
        """Tell the pool process Celery has begun writing ``job`` to, if it has (``again``:
        unless that process has acknowledged the job meanwhile, and was told then)."""
        if again and job not in self.done:
            return False
        handle = getattr(request, "_apply_result", None)
        proc = getattr(handle and handle(), "_write_to", None)
        if proc is None:
            return False
        self.done.discard(job)
        self.told[job] = proc.pid
        self._tell(job, proc.pid)
        return True

    def accepted(self, job: str, pid: int) -> None:
        if RELAY == "spin":
            return
        if job in self.told:
            if self.told.pop(job) != pid:  # written again to another process
                self._tell(job, pid)
        elif job in self.done:
            self.done.discard(job)
            self._tell(job, pid)
        else:
            self.taken[job] = pid

    def _tell(self, job: str, pid: int) -> None:
        self.sock.sendto(job.encode(), _address(pid))


_relay: list[_Relay] = []


def _main_relay() -> _Relay:
    if not _relay:
        _relay.append(_Relay())
    return _relay[0]


class OverlapRequest(Request):  # type: ignore[misc]
    """Celery's request, its job's write sent as Celery builds it from the message (its
    ``execute_using_pool`` is Celery's per-task subclass's, which does not call up)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _main_relay().send(self.id, self)

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        super().on_accepted(pid, time_accepted)
        _main_relay().accepted(self.id, pid)


_inbox: list[socket.socket] = []


@signals.worker_process_init.connect(weak=False)
def _listen(**_: Any) -> None:
    """Each pool process binds its address before it takes a job."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(_address(os.getpid()))
    sock.settimeout(RELAY_TIMEOUT_S)
    _inbox[:] = [sock]


def wait_relayed(job: str) -> None:
    """Block until the main process relays that ``job``'s write has committed."""
    want = job.encode()
    if RELAY == "spin":
        give_up = time.monotonic() + RELAY_TIMEOUT_S
        slots = _slots(want)
        while True:
            for at in slots:
                if _shared[at : at + _SLOT] == want:
                    _shared[at : at + _SLOT] = _EMPTY
                    return
            if time.monotonic() > give_up:
                raise TimeoutError(f"no relayed answer for {job}")
            time.sleep(0)
    while _inbox[0].recv(128) != want:
        pass  # an answer for an earlier job this process no longer waits for


@app.task(name="bench.noop_overlap", bind=True, Request=OverlapRequest)
def noop_overlap(self: Any) -> None:
    """Plain Celery's no-op, once the main process's write for it has committed."""
    wait_relayed(self.request.id)
