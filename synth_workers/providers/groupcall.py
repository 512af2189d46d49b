"""Group commit: concurrent calls of one kind, from many job threads, run as one call.

Each caller queues its item and takes a turn; whoever holds the turn runs **everything
queued** (up to ``limit`` in weight) as one call, so while one call is on the wire (or, in
Qdrant's local mode, holds the client) the next callers' items gather for the next one. A
caller returns when its own item is done, with its own share of the result, or raises.

Failures stay with their owner: when a shared call raises one of ``split_on`` (a refused
request), each item is run again alone, so only the item that caused it fails; any other
error (the service is away) is every item's error, each caller's own to retry.

Used by :class:`~synth_workers.providers.vectors.VectorStore` for upserts and chunk-count
lookups: the texts of 64 jobs come out of one forward pass together, and their points go
into Qdrant in one or two upserts instead of 64.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Shared(Generic[R]):
    """One caller's result and the call that carried it."""

    value: R
    #: Process-local number of the call (the same for every caller it carried).
    call: int
    #: How many callers that call carried (1: this caller alone).
    callers: int


@dataclass(eq=False)
class _Entry(Generic[T, R]):
    item: T
    future: Future[Shared[R]] = field(default_factory=Future)


class GroupCall(Generic[T, R]):
    """Run ``run(items) -> results`` (one result per item, in order) for concurrent callers,
    as few times as their arrivals allow."""

    def __init__(
        self,
        run: Callable[[Sequence[T]], Sequence[R]],
        *,
        weight: Callable[[T], int] = lambda _item: 1,
        limit: int = 1024,
        split_on: tuple[type[BaseException], ...] = (),
    ) -> None:
        self._run = run
        self._weight = weight
        self._limit = max(1, limit)
        self._split_on = split_on
        self._mutex = threading.Lock()  # guards the queue (held for microseconds)
        self._turn = threading.Lock()  # held by the caller running a call
        self._queue: list[_Entry[T, R]] = []
        self._numbers = itertools.count(1)
        #: Calls of ``run`` made so far (splits included).
        self.calls = 0

    def call(self, item: T) -> Shared[R]:
        """``item``'s result; blocks while an earlier call runs, then may run others' too."""
        mine: _Entry[T, R] = _Entry(item)
        with self._mutex:
            self._queue.append(mine)
        while not mine.future.done():
            with self._turn:
                if mine.future.done():
                    break
                self._run_group(self._take())
        return mine.future.result()

    def _take(self) -> list[_Entry[T, R]]:
        """The queued entries, oldest first, up to the weight limit (at least one)."""
        with self._mutex:
            total = 0
            count = 0
            for entry in self._queue:
                total += self._weight(entry.item)
                if count and total > self._limit:
                    break
                count += 1
            batch, self._queue = self._queue[:count], self._queue[count:]
        return batch

    def _run_group(self, batch: list[_Entry[T, R]]) -> None:
        if not batch:
            return
        number = next(self._numbers)
        self.calls += 1
        try:
            results = self._run([entry.item for entry in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"group call gave {len(results)} results for {len(batch)}")
        except self._split_on as exc:
            if len(batch) == 1:
                batch[0].future.set_exception(exc)
                return
            for entry in batch:  # only the item that caused it fails
                self._run_group([entry])
            return
        except Exception as exc:
            for entry in batch:
                entry.future.set_exception(exc)
            return
        except BaseException as exc:  # the thread is being stopped: the others must not hang
            for entry in batch:
                entry.future.set_exception(exc)
            raise
        for entry, result in zip(batch, results, strict=True):
            entry.future.set_result(Shared(result, number, len(batch)))
