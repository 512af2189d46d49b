"""Embedding jobs: index documents into a Qdrant collection, or delete them.

``tasks.embeddings.index_documents`` chunks each document (``chunk_size`` characters,
consecutive chunks sharing ``chunk_overlap``), embeds the chunks and upserts one point per
chunk. Point ids are deterministic — ``uuid5(doc id, chunk index)`` — so running a job again
(retry, redelivery, the same documents sent twice) replaces points instead of adding them;
chunks a shorter new version no longer has are deleted (found by id from the old
chunk 0's ``chunk_count``, not by a scan). The collection is created on first
use with the model's vector size and ``SYNTH_EMBED_DISTANCE``. Each point's payload holds
``doc_id``, ``chunk_index``, ``chunk_count``, ``text`` and the document's ``metadata``.

``tasks.embeddings.delete_documents`` deletes every point of the given document ids
(a filter on the ``doc_id`` payload field).

The tasks are thin: :func:`index_documents` and :func:`delete_documents` are plain functions
over an :class:`~synth_workers.providers.batching.EmbeddingService` and a
:class:`~synth_workers.providers.vectors.VectorStore`. Provider errors are already mapped
(``synth_workers.providers``): transient ones retry, a 429 after its Retry-After, the rest
dead-letter.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from celery import shared_task
from pydantic import BaseModel, Field, field_validator, model_validator

from synth_workers.batchtier import collector
from synth_workers.errors import ConfigurationError, PermanentError
from synth_workers.producer import JobHandle, enqueue
from synth_workers.providers.batching import EmbedOutcome, embedding_service
from synth_workers.providers.embedder import EmbeddingRateLimitedError
from synth_workers.routing import Priority
from synth_workers.settings import Settings
from synth_workers.task import Task

if TYPE_CHECKING:
    from synth_workers.providers.vectors import VectorStore

#: Namespace of point ids: ``uuid5(POINT_NAMESPACE, f"{doc_id}#{chunk_index}")``. Fixed
#: forever: changing it would make every re-run add points instead of replacing them.
POINT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "synth-workers:embeddings:point")
_COLLECTION = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}$"


class Document(BaseModel):
    """One document to index."""

    id: str = Field(min_length=1, max_length=512)
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id", mode="before")
    @classmethod
    def _int_id(cls, value: object) -> object:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class IndexPayload(BaseModel):
    """Documents to chunk, embed and upsert; unset options take the settings."""

    documents: list[Document] = Field(min_length=1, max_length=10_000)
    collection: str | None = Field(default=None, pattern=_COLLECTION)
    chunk_size: int | None = Field(default=None, ge=1)
    chunk_overlap: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> IndexPayload:
        ids = [d.id for d in self.documents]
        if len(set(ids)) != len(ids):
            raise ValueError("document ids must be unique within a job")
        if (
            self.chunk_size is not None
            and self.chunk_overlap is not None
            and self.chunk_overlap >= self.chunk_size
        ):
            raise ValueError("chunk_overlap must be below chunk_size")
        return self


class DeletePayload(BaseModel):
    """Documents whose points to delete."""

    document_ids: list[str] = Field(min_length=1, max_length=10_000)
    collection: str | None = Field(default=None, pattern=_COLLECTION)


class Embeds(Protocol):
    """What :func:`index_documents` embeds with: an :class:`EmbeddingService`, or a
    deferrable job's batch (:class:`BatchEmbeddings`)."""

    @property
    def model(self) -> str: ...

    def embed(self, texts: Sequence[str]) -> EmbedOutcome: ...


class BatchEmbeddings:
    """A deferrable OpenAI embedding job's texts through the batch tier: its first run parks
    the job, its next one gets the batch's vectors (``tokens``: what the batch reported)."""

    def __init__(self, task: Task, model: str) -> None:
        self.task = task
        self._model = model
        self.tokens: int | None = None

    @property
    def model(self) -> str:
        return self._model

    def embed(self, texts: Sequence[str]) -> EmbedOutcome:
        answer = collector.embed(self.task, self._model, list(texts))
        if answer is None:  # sent back online
            return embedding_service(self.task.synth_app.settings).embed(texts)
        vectors, self.tokens = answer
        return EmbedOutcome(vectors, (), 1)


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    """Cut ``text`` into windows of ``size`` characters, each sharing ``overlap`` with the last.

    An empty (or blank) text has no chunks; a text of at most ``size`` characters is one
    chunk; the last window ends at the end of the text (it may be shorter).
    """
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"chunk overlap must be in [0, {size}), got {overlap}")
    if not text.strip():
        return []
    step = size - overlap
    chunks = [text[start : start + size] for start in range(0, len(text) - overlap, step)]
    return chunks or [text]


def chunking(payload: IndexPayload, settings: Settings) -> tuple[int, int]:
    """Chunk size and overlap for ``payload``: its own, else the settings'.

    A job that sets only a ``chunk_size`` at or below the configured overlap gets a fifth of
    its size as overlap; an overlap that is not below the size is a ``PermanentError``.
    """
    size = payload.chunk_size or settings.embed_chunk_size
    overlap = payload.chunk_overlap
    if overlap is None:
        overlap = settings.embed_chunk_overlap
        if overlap >= size:
            overlap = size // 5
    if overlap >= size:
        raise PermanentError(f"chunk_overlap ({overlap}) must be below chunk_size ({size})")
    return size, overlap


def point_id(doc_id: str, chunk_index: int) -> str:
    """The id of chunk ``chunk_index`` of document ``doc_id`` (the same in every run)."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{doc_id}#{chunk_index}"))


def index_documents(
    payload: IndexPayload, settings: Settings, embedder: Embeds, store: VectorStore
) -> dict[str, Any]:
    """Chunk, embed and upsert ``payload``'s documents; return a summary for the ledger."""
    # qdrant-client on first use (not at worker start-up: it takes ~0.7 s to import)
    from qdrant_client import models

    from synth_workers.providers.vectors import CHUNK_INDEX, DOC_ID

    size, overlap = chunking(payload, settings)
    collection = payload.collection or settings.embed_collection
    texts: list[str] = []
    owners: list[tuple[Document, int, int]] = []  # document, chunk index, chunk count
    for doc in payload.documents:
        chunks = chunk_text(doc.text, size, overlap)
        texts.extend(chunks)
        owners.extend((doc, i, len(chunks)) for i in range(len(chunks)))
    outcome = embedder.embed(texts)
    points = [
        models.PointStruct(
            id=point_id(doc.id, index),
            vector=vector,
            payload={
                DOC_ID: doc.id,
                CHUNK_INDEX: index,
                "chunk_count": count,
                "text": text,
                "metadata": doc.metadata,
            },
        )
        for (doc, index, count), text, vector in zip(owners, texts, outcome.vectors, strict=True)
    ]
    dimension = len(outcome.vectors[0]) if outcome.vectors else None
    # Chunks an earlier, longer version of a document had: its chunk 0 says how many there
    # were (a lookup by id, not a scan). They go before the upsert rewrites chunk 0, so a
    # run cut off in between leaves the old count for the next run to act on.
    firsts = {point_id(doc.id, 0): doc for doc in payload.documents}
    before = store.payload_values(collection, list(firsts), "chunk_count")
    counts = {doc.id: count for doc, _, count in owners}
    stale = [
        point_id(doc.id, index)
        for first, doc in firsts.items()
        if isinstance(before.get(first), int)
        for index in range(counts.get(doc.id, 0), before[first])
    ]
    store.delete_points(collection, stale)
    written = None
    if dimension is not None:
        store.ensure_collection(collection, dimension, settings.embed_distance)
        written = store.upsert(collection, points)
    return {
        "collection": collection,
        "documents": len(payload.documents),
        "points": len(points),
        "stale_deleted": len(stale),
        "dimension": dimension,
        "model": embedder.model,
        "forward_passes": list(outcome.passes),
        "batch_jobs": outcome.batch_jobs,
        "pass_texts": list(outcome.pass_texts),
        "pass_ms": list(outcome.pass_ms),
        # the shared upsert that wrote this job's points, and how many jobs' points it carried
        "upsert_call": written.call if written else None,
        "upsert_jobs": written.callers if written else 0,
    }


def delete_documents(
    payload: DeletePayload, settings: Settings, store: VectorStore
) -> dict[str, Any]:
    """Delete every point of ``payload``'s documents."""
    collection = payload.collection or settings.embed_collection
    store.delete_documents(collection, payload.document_ids)
    return {"collection": collection, "documents": len(payload.document_ids)}


def _vector_store(settings: Settings) -> VectorStore:
    from synth_workers.providers.vectors import vector_store

    return vector_store(settings)


@shared_task(name="tasks.embeddings.index_documents", bind=True, payload_model=IndexPayload)
def index_documents_task(self: Task, payload: IndexPayload) -> dict[str, Any]:
    settings = self.synth_app.settings
    try:
        if settings.embed_provider == "openai" and collector.deferrable(self):
            return _index_batched(self, payload, settings)
        return index_documents(
            payload, settings, embedding_service(settings), _vector_store(settings)
        )
    except EmbeddingRateLimitedError as exc:  # wait what the provider asked; no attempt used
        self.defer(exc.retry_after if exc.retry_after is not None else 1.0, "rate_limited")
    except ConfigurationError as exc:  # no model, a locked Qdrant folder: retrying won't help
        raise PermanentError(str(exc)) from exc


def _index_batched(task: Task, payload: IndexPayload, settings: Settings) -> dict[str, Any]:
    """A deferrable job's indexing, its vectors from a batch, with the tokens and the credits
    (at the batch price) in its result."""
    from synth_workers.providers.embedder import DEFAULT_OPENAI_MODEL
    from synth_workers.providers.llm import credits

    model = settings.embed_model or DEFAULT_OPENAI_MODEL
    embedder = BatchEmbeddings(task, model)
    result = index_documents(payload, settings, embedder, _vector_store(settings))
    if embedder.tokens is not None:
        cost = credits(settings, "openai", model, embedder.tokens, 0)
        result["batch"] = True
        result["input_tokens"] = embedder.tokens
        result["credits"] = round(cost * settings.batch.price_factor, 6)
    return result


@shared_task(name="tasks.embeddings.delete_documents", bind=True, payload_model=DeletePayload)
def delete_documents_task(self: Task, payload: DeletePayload) -> dict[str, Any]:
    settings = self.synth_app.settings
    try:
        return delete_documents(payload, settings, _vector_store(settings))
    except ConfigurationError as exc:
        raise PermanentError(str(exc)) from exc


def enqueue_index(
    documents: list[Document] | list[dict[str, Any]],
    *,
    collection: str | None = None,
    gpu: bool = False,
    priority: Priority | None = None,
    idempotency_key: str | None = None,
) -> JobHandle:
    """Typed helper: enqueue one indexing job (``gpu=True``: for the GPU workers)."""
    payload: dict[str, Any] = {"documents": documents}
    if collection is not None:
        payload["collection"] = collection
    return enqueue(
        "tasks.embeddings.index_documents",
        payload,
        gpu=gpu,
        priority=priority,
        idempotency_key=idempotency_key,
    )
