"""Micro-batching: the texts of many concurrent embedding jobs in one forward pass.

A worker consuming the embedding queues with the threads pool runs many jobs at once in one
process. Each job's thread hands its texts to this process's :class:`EmbeddingService` and
blocks on a future; with batching on, a batcher thread collects submissions until
``SYNTH_EMBED_BATCH_MAX`` texts are waiting or ``SYNTH_EMBED_BATCH_LINGER_MS`` has passed
since the first, runs **one** ``embed`` call for all of them, and hands each job its own
vectors. While a pass runs the next submissions queue up, so under load batches fill without
waiting. Each job keeps its own claim, result and ledger state: only the forward pass is
shared.

A job with more texts than the batch maximum is split into parts of at most that many. If
the provider refuses a shared batch as a bad request, each job's part is tried alone, so only
the job with the bad input is dead-lettered. With batching off, each job embeds its own texts
(at most the batch maximum per pass); the local model still runs one pass at a time.

The embedder is created once per process (``embedding_service``): the local model is loaded
by the first job of a process and shared by all its threads. A process running the local
model also gets a short thread switch interval (``SYNTH_EMBED_SWITCH_INTERVAL_MS``, 0.5 ms):
a forward pass re-takes the GIL after each of its many operations, and with job threads
running Python each of those waits up to Python's 5-ms default (measured on 2 CPU cores:
about twice the batched throughput with 0.5 ms).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from synth_workers.providers.embedder import (
    Embedder,
    EmbeddingRequestError,
    EmbeddingUnavailableError,
    create_embedder,
)

if TYPE_CHECKING:
    from synth_workers.settings import Settings

# vectors, pass number, jobs in that pass, the pass's texts and wall seconds
_PassResult = tuple[list[list[float]], int, int, int, float]


@dataclass(frozen=True)
class EmbedOutcome:
    """One job's vectors and how they were computed."""

    vectors: list[list[float]]
    #: Process-local numbers of the forward passes that carried this job's texts.
    passes: tuple[int, ...]
    #: Most jobs that shared one of those passes (1: this job alone).
    batch_jobs: int
    #: Per pass: its texts (all jobs') and its wall time in ms (the model's own time).
    pass_texts: tuple[int, ...] = ()
    pass_ms: tuple[float, ...] = ()


@dataclass(eq=False)
class _Part:
    job: object
    texts: list[str]
    future: Future[_PassResult] = field(default_factory=Future)


class EmbeddingService:
    """This process's front of an embedder: direct passes or micro-batched ones."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        batching: bool = True,
        max_batch: int = 64,
        linger: float = 0.005,
    ) -> None:
        self.embedder = embedder
        self.batching = batching
        self.max_batch = max(1, max_batch)
        self.linger = max(0.0, linger)
        #: Forward passes (``embed`` calls) run so far by this service.
        self.passes = 0
        self._count_lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Part | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if batching:
            self._thread = threading.Thread(
                target=self._run, name="synth-embed-batcher", daemon=True
            )
            self._thread.start()

    @property
    def model(self) -> str:
        return self.embedder.model

    def embed(self, texts: Sequence[str]) -> EmbedOutcome:
        """Vectors for ``texts`` (in order); blocks until its pass(es) ran."""
        texts = list(texts)
        if not texts:
            return EmbedOutcome([], (), 0)
        pieces = [texts[i : i + self.max_batch] for i in range(0, len(texts), self.max_batch)]
        if not self.batching:
            return self._direct(pieces)
        token = object()
        parts = [_Part(token, piece) for piece in pieces]
        for part in parts:
            self._queue.put(part)
        vectors: list[list[float]] = []
        passes: list[int] = []
        sizes: list[int] = []
        times: list[float] = []
        shared = 1
        for part in parts:
            got, number, jobs, size, seconds = self._wait(part.future)
            vectors.extend(got)
            passes.append(number)
            sizes.append(size)
            times.append(round(seconds * 1000, 2))
            shared = max(shared, jobs)
        return EmbedOutcome(vectors, tuple(passes), shared, tuple(sizes), tuple(times))

    def close(self) -> None:
        """Stop the batcher thread (after the submissions already queued)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=10)

    # --- internals ------------------------------------------------------------------------
    def _next_pass(self) -> int:
        with self._count_lock:
            self.passes += 1
            return self.passes

    def _direct(self, pieces: list[list[str]]) -> EmbedOutcome:
        vectors: list[list[float]] = []
        passes: list[int] = []
        times: list[float] = []
        for piece in pieces:  # (the local model runs one pass at a time; an API, many)
            passes.append(self._next_pass())
            started = time.perf_counter()
            vectors.extend(self._checked(piece, self.embedder.embed(piece)))
            times.append(round((time.perf_counter() - started) * 1000, 2))
        sizes = tuple(len(piece) for piece in pieces)
        return EmbedOutcome(vectors, tuple(passes), 1, sizes, tuple(times))

    def _wait(self, future: Future[_PassResult]) -> _PassResult:
        while True:
            try:
                return future.result(timeout=1.0)
            except TimeoutError:
                if self._thread is None or not self._thread.is_alive():
                    raise EmbeddingUnavailableError("the embedding batcher stopped") from None

    @staticmethod
    def _checked(texts: list[str], vectors: list[list[float]]) -> list[list[float]]:
        if len(vectors) != len(texts):
            raise EmbeddingUnavailableError(
                f"embedder returned {len(vectors)} vectors for {len(texts)} texts"
            )
        return vectors

    def _run(self) -> None:
        carry: _Part | None = None
        while True:
            first = carry if carry is not None else self._queue.get()
            carry = None
            if first is None:
                return
            batch = [first]
            size = len(first.texts)
            deadline = time.monotonic() + self.linger
            stop = False
            while size < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    part = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if part is None:
                    stop = True
                    break
                if size + len(part.texts) > self.max_batch:
                    carry = part  # opens the next pass
                    break
                batch.append(part)
                size += len(part.texts)
            self._run_pass(batch)
            if stop:
                return

    def _run_pass(self, batch: list[_Part]) -> None:
        texts = [text for part in batch for text in part.texts]
        jobs = len({id(part.job) for part in batch})
        number = self._next_pass()
        started = time.perf_counter()
        try:
            vectors = self._checked(texts, self.embedder.embed(texts))
        except EmbeddingRequestError as exc:
            if jobs == 1:
                for part in batch:
                    part.future.set_exception(exc)
                return
            # A bad request in a shared pass: try each part alone, so only the culprit fails.
            for part in batch:
                self._run_pass([part])
            return
        except BaseException as exc:
            for part in batch:
                part.future.set_exception(exc)
            return
        seconds = time.perf_counter() - started
        start = 0
        for part in batch:
            end = start + len(part.texts)
            part.future.set_result((vectors[start:end], number, jobs, len(texts), seconds))
            start = end


_services: dict[tuple[object, ...], EmbeddingService] = {}
_services_lock = threading.Lock()


def embedding_service(settings: Settings) -> EmbeddingService:
    """This process's service for ``settings`` (created, and the model loaded, once)."""
    key = (
        os.getpid(),
        settings.embed_provider,
        settings.embed_model,
        settings.embed_device,
        settings.embed_base_url,
        settings.embed_batching,
        settings.embed_batch_max,
        settings.embed_batch_linger_ms,
    )
    service = _services.get(key)
    if service is not None:
        return service
    with _services_lock:  # the other threads wait for the one loading the model
        service = _services.get(key)
        if service is None:
            if any(k[0] != key[0] for k in _services):  # inherited through fork: not ours
                _services.clear()
            if settings.embed_provider == "local" and settings.embed_switch_interval_ms > 0:
                # The model's forward pass takes the GIL back after each operation; with job
                # threads running Python, Python's 5-ms switch interval makes it wait that long
                # each time (a convoy): hand the interpreter over sooner in this process.
                sys.setswitchinterval(settings.embed_switch_interval_ms / 1000.0)
            service = _services[key] = EmbeddingService(
                create_embedder(settings),
                batching=settings.embed_batching,
                max_batch=settings.embed_batch_max,
                linger=settings.embed_batch_linger_ms / 1000.0,
            )
        return service
