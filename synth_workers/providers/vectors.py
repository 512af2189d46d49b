"""The vector store: Qdrant through ``qdrant-client``.

A Qdrant server when ``QDRANT_URL`` is set (``QDRANT_API_KEY`` if it needs one); otherwise
Qdrant's **local mode** in ``SYNTH_QDRANT_PATH`` (``:memory:`` keeps nothing past the process).

Local mode on disk takes an exclusive lock on its folder: exactly one process may open it.
Run the worker that consumes the embedding queues with a non-forking pool (``-P threads``
or ``solo``: one process, many jobs), or give every worker a Qdrant server. A second
process opening the same folder gets a :class:`~synth_workers.errors.ConfigurationError`
that says so. Inside one process the local client is shared by all threads behind a lock;
a server client is used by them concurrently.

Concurrent upserts into one collection are written as one call, and so are concurrent
chunk-count lookups (group commit, :mod:`~synth_workers.providers.groupcall`): the jobs whose
texts shared a forward pass reach the store together, and their points go in one upsert (or a
few) instead of one each. Each job still returns only once its own points are stored; a
refused shared upsert is retried point set by point set, so only the job at fault fails.

Failures map onto the platform's error tree: connection errors, timeouts, 5xx and 429 are
:class:`VectorStoreUnavailableError` (retry); other 4xx and a collection whose vector size
does not match the model are :class:`VectorStoreRequestError` (dead-letter).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import httpx
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from synth_workers.errors import ConfigurationError, PermanentError, TransientError
from synth_workers.providers.groupcall import GroupCall, Shared

if TYPE_CHECKING:
    from synth_workers.settings import Settings

Distance = Literal["cosine", "dot", "euclid"]
_DISTANCES: dict[str, models.Distance] = {
    "cosine": models.Distance.COSINE,
    "dot": models.Distance.DOT,
    "euclid": models.Distance.EUCLID,
}
#: Payload field holding a point's document id (indexed on a server; deletes filter on it).
DOC_ID = "doc_id"
CHUNK_INDEX = "chunk_index"
#: Points per shared upsert at most (a job's own points always go in one call).
UPSERT_GROUP_POINTS = 1024
_Points = Sequence[models.PointStruct]
_K = TypeVar("_K")


class VectorStoreUnavailableError(TransientError):
    """Qdrant could not be reached or failed in a way worth retrying."""


class VectorStoreRequestError(PermanentError):
    """Qdrant refused the request, or the collection does not fit the vectors."""


class VectorStore:
    """The operations the embedding jobs need, over one ``QdrantClient``."""

    def __init__(self, client: QdrantClient, *, local: bool) -> None:
        self.client = client
        self.local = local
        self._lock = threading.RLock() if local else None
        self._known: dict[str, int] = {}
        self._groups_lock = threading.Lock()
        self._upserts: dict[str, GroupCall[_Points, None]] = {}
        self._lookups: dict[tuple[str, str], GroupCall[Sequence[str], dict[str, Any]]] = {}

    @classmethod
    def from_settings(cls, settings: Settings) -> VectorStore:
        if settings.qdrant_url:
            key = settings.qdrant_api_key
            client = QdrantClient(
                url=settings.qdrant_url,
                api_key=key.get_secret_value() if key else None,
                timeout=30,
            )
            return cls(client, local=False)
        path = settings.qdrant_path
        try:
            if path == ":memory:":
                client = QdrantClient(location=":memory:")
            else:
                client = QdrantClient(path=path, force_disable_check_same_thread=True)
        except RuntimeError as exc:  # the folder's lock is held by another process
            raise ConfigurationError(
                f"SYNTH_QDRANT_PATH={path}: {exc} Local mode is one process only: run the "
                "embedding worker with -P threads (or solo), or set QDRANT_URL."
            ) from exc
        return cls(client, local=True)

    def close(self) -> None:
        with self._locked():
            self.client.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._lock is None:
            yield
            return
        with self._lock:
            yield

    @contextlib.contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        """Serialize local mode; map the client's failures onto retry / dead-letter."""
        try:
            with self._locked():
                yield
        except UnexpectedResponse as exc:
            status = exc.status_code
            text = f"qdrant {what}: {status}: {exc.content[:500]!r}"
            if status is None or status >= 500 or status in (408, 429):
                raise VectorStoreUnavailableError(text) from exc
            raise VectorStoreRequestError(text) from exc
        except (ResponseHandlingException, httpx.TransportError, ConnectionError) as exc:
            raise VectorStoreUnavailableError(f"qdrant {what}: {exc}") from exc

    def ensure_collection(self, name: str, size: int, distance: Distance = "cosine") -> bool:
        """Create ``name`` for ``size``-dimensional vectors if missing; True if created.

        An existing collection must hold vectors of ``size`` dimensions (another model's
        collection is refused: a ``VectorStoreRequestError`` naming both sizes).
        """
        if self._known.get(name) == size:
            return False
        created = False
        with self._calling("create collection"):
            if not self.client.collection_exists(name):
                try:
                    self.client.create_collection(
                        name,
                        vectors_config=models.VectorParams(
                            size=size, distance=_DISTANCES[distance]
                        ),
                    )
                    created = True
                except UnexpectedResponse as exc:
                    if exc.status_code != 409:  # 409: another worker created it just now
                        raise
                if created and not self.local:
                    self.client.create_payload_index(
                        name, DOC_ID, field_schema=models.PayloadSchemaType.KEYWORD
                    )
            existing = self._vector_size(name)
        if existing != size:
            raise VectorStoreRequestError(
                f"collection {name!r} holds {existing}-dimensional vectors; this model makes "
                f"{size}: use another collection (or the model it was built with)"
            )
        self._known[name] = size
        return created

    def _vector_size(self, name: str) -> int | None:
        params = self.client.get_collection(name).config.params.vectors
        if isinstance(params, models.VectorParams):
            return int(params.size)
        return None  # named vectors: not a collection of ours

    def _group(
        self, groups: dict[_K, GroupCall[Any, Any]], key: _K, make: Callable[[], Any]
    ) -> Any:
        group = groups.get(key)
        if group is None:
            with self._groups_lock:
                group = groups.setdefault(key, make())
        return group

    def upsert(self, name: str, points: Sequence[models.PointStruct]) -> Shared[None] | None:
        """Write ``points`` (same id: replaced), returning once they are stored: with the
        concurrent upserts into ``name``, in one call (which one, and how many jobs' points it
        carried, is the answer; ``None`` for no points)."""
        if not points:
            return None
        group: GroupCall[_Points, None] = self._group(
            self._upserts,
            name,
            lambda: GroupCall(
                lambda sets: self._upsert_now(name, sets),
                weight=len,
                limit=UPSERT_GROUP_POINTS,
                split_on=(VectorStoreRequestError,),
            ),
        )
        return group.call(list(points))

    def _upsert_now(self, name: str, sets: Sequence[_Points]) -> list[None]:
        with self._calling("upsert"):
            self.client.upsert(name, points=[p for one in sets for p in one], wait=True)
        return [None] * len(sets)

    def payload_values(self, name: str, ids: Sequence[str], key: str) -> dict[str, Any]:
        """``{point id: payload[key]}`` for those of ``ids`` that exist (a lookup by id; the
        concurrent lookups in ``name`` share one call)."""
        if not ids:
            return {}
        group: GroupCall[Sequence[str], dict[str, Any]] = self._group(
            self._lookups,
            (name, key),
            lambda: GroupCall(
                lambda asks: self._lookup_now(name, key, asks),
                weight=len,
                limit=UPSERT_GROUP_POINTS,
                split_on=(VectorStoreRequestError,),
            ),
        )
        answer: dict[str, Any] = group.call(list(ids)).value
        return answer

    def _lookup_now(
        self, name: str, key: str, asks: Sequence[Sequence[str]]
    ) -> list[dict[str, Any]]:
        wanted = list(dict.fromkeys(i for ids in asks for i in ids))
        with self._calling("retrieve"):
            if name not in self._known and not self.client.collection_exists(name):
                return [{} for _ in asks]
            records = self.client.retrieve(name, ids=wanted, with_payload=[key], with_vectors=False)
        found = {str(r.id): (r.payload or {}).get(key) for r in records}
        return [{i: found[i] for i in ids if i in found} for ids in asks]

    def delete_points(self, name: str, ids: Sequence[str]) -> None:
        """Delete the points ``ids`` (missing ones are ignored)."""
        if not ids:
            return
        with self._calling("delete"):
            self.client.delete(
                name, points_selector=models.PointIdsList(points=list(ids)), wait=True
            )

    def delete_documents(self, name: str, doc_ids: Sequence[str]) -> None:
        """Delete every point whose ``doc_id`` is one of ``doc_ids`` (a payload filter)."""
        if not doc_ids:
            return
        selector = models.FilterSelector(
            filter=models.Filter(
                must=[models.FieldCondition(key=DOC_ID, match=models.MatchAny(any=list(doc_ids)))]
            )
        )
        with self._calling("delete"):
            if name not in self._known and not self.client.collection_exists(name):
                return
            self.client.delete(name, points_selector=selector, wait=True)

    def count(self, name: str, doc_ids: Sequence[str] | None = None) -> int:
        """Points in ``name`` (of ``doc_ids`` only, when given); 0 for no collection."""
        flt = None
        if doc_ids is not None:
            flt = models.Filter(
                must=[models.FieldCondition(key=DOC_ID, match=models.MatchAny(any=list(doc_ids)))]
            )
        with self._calling("count"):
            if not self.client.collection_exists(name):
                return 0
            return int(self.client.count(name, count_filter=flt, exact=True).count)


_stores: dict[tuple[Any, ...], VectorStore] = {}
_stores_lock = threading.Lock()


def close_stores() -> None:
    """Close this process's stores (at exit, while Python can still import: left to
    ``QdrantClient.__del__`` during interpreter shutdown, local mode prints a traceback)."""
    with _stores_lock:
        stores = [store for key, store in _stores.items() if key[0] == os.getpid()]
        _stores.clear()
    for store in stores:
        with contextlib.suppress(Exception):
            store.close()


def vector_store(settings: Settings) -> VectorStore:
    """This process's store for ``settings`` (opened once; local mode locks its folder)."""
    key = (os.getpid(), settings.qdrant_url, settings.qdrant_path)
    store = _stores.get(key)
    if store is not None:
        return store
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            if any(k[0] != key[0] for k in _stores):  # inherited through fork: not ours
                _stores.clear()
            store = _stores[key] = VectorStore.from_settings(settings)
            atexit.unregister(close_stores)  # once per process
            atexit.register(close_stores)
        return store
