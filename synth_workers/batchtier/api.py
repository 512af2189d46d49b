"""The providers' batch APIs through their official SDKs.

- OpenAI: the requests as a JSONL file (``files.create``, purpose ``batch``), then
  ``batches.create`` with ``metadata={"synth_batch": <our batch id>}``; results are the
  output and error files (``files.content``).
- Anthropic: ``messages.batches.create`` with the requests; results through
  ``messages.batches.results``. A message batch carries no metadata: a batch whose submission
  went unrecorded is recognised by its requests' custom ids once it has ended.

Errors map as for online calls: 5xx, 408, 409, 429, timeouts and connection errors are
:class:`ProviderUnavailableError` (try again later), other 4xx :class:`ProviderRejectedError`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from synth_workers.errors import ProviderRejectedError, ProviderUnavailableError
from synth_workers.providers import llm
from synth_workers.settings import Settings

#: OpenAI batch statuses after which nothing changes.
OPENAI_ENDED = frozenset({"completed", "expired", "cancelled", "failed"})
#: Anthropic error types as HTTP statuses (what a per-request error means for the job).
ANTHROPIC_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}
ENDPOINTS = {"chat": "/v1/chat/completions", "embeddings": "/v1/embeddings"}
#: Seconds of clock skew allowed when looking for a batch created after its intent.
SKEW = 300.0


@dataclass
class Results:
    """What an ended batch returned: answers and per-request errors, each (custom id,
    body); the requests in neither (expired, cancelled) are given back."""

    done: list[tuple[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, Any]] = field(default_factory=list)
    #: The whole batch was refused (OpenAI ``failed``): (status, message).
    refused: tuple[int, str] | None = None


@contextmanager
def _mapped(provider: str) -> Iterator[None]:
    sdk: Any = importlib.import_module(provider)
    try:
        yield
    except sdk.APIStatusError as exc:
        status = int(exc.status_code)
        text = f"{provider} batch API {status}: {exc.message}"
        if status >= 500 or status in (408, 409, 429):
            raise ProviderUnavailableError(text, status) from exc
        raise ProviderRejectedError(text, status) from exc
    except (sdk.APITimeoutError, sdk.APIConnectionError) as exc:
        raise ProviderUnavailableError(f"{provider} batch API: {exc}") from exc


class BatchAPI:
    """One provider's batch endpoints for one kind of request (``chat``, ``embeddings``)."""

    def __init__(self, settings: Settings, provider: str, kind: str) -> None:
        self.provider = provider
        self.kind = kind
        if kind == "embeddings":
            import openai

            key = settings.openai_api_key
            base = settings.embed_base_url
            self.client: Any = openai.OpenAI(
                api_key=key.get_secret_value() if key else ("no-key" if base else None),
                base_url=base,
                timeout=settings.embed_timeout,
                max_retries=0,
            )
        else:
            self.client = llm.client(settings, "openai" if provider == "openai" else "anthropic")

    def submit(self, batch_id: str, items: Sequence[tuple[str, dict[str, Any]]]) -> tuple[str, str]:
        """Send the requests as one batch; returns the provider's batch id and status."""
        with _mapped(self.provider):
            if self.provider == "openai":
                endpoint = ENDPOINTS[self.kind]
                lines = (
                    json.dumps({"custom_id": c, "method": "POST", "url": endpoint, "body": b})
                    for c, b in items
                )
                data = ("\n".join(lines) + "\n").encode()
                upload = self.client.files.create(
                    file=(f"synth-{batch_id}.jsonl", data, "application/jsonl"), purpose="batch"
                )
                made = self.client.batches.create(
                    input_file_id=upload.id,
                    endpoint=endpoint,
                    completion_window="24h",
                    metadata={"synth_batch": batch_id},
                )
                return str(made.id), str(made.status)
            made = self.client.messages.batches.create(
                requests=[{"custom_id": c, "params": b} for c, b in items]
            )
            return str(made.id), str(made.processing_status)

    def find(
        self, batch_id: str, custom_ids: set[str], since: float, known: set[str]
    ) -> str | Literal["unknown"] | None:
        """The provider's id of our batch ``batch_id`` if it was created (its submitter died
        before recording it); ``None`` when it was not, ``"unknown"`` while a batch that may
        be it has not ended (Anthropic: its custom ids are readable only then)."""
        with _mapped(self.provider):
            if self.provider == "openai":
                for found in self.client.batches.list(limit=100):
                    if found.created_at < since - SKEW:
                        return None
                    if (found.metadata or {}).get("synth_batch") == batch_id:
                        return str(found.id)
                return None
            undecided = False
            for found in self.client.messages.batches.list(limit=100):
                if found.created_at.timestamp() < since - SKEW:
                    break
                if found.id in known:
                    continue
                if found.processing_status != "ended":
                    undecided = True
                    continue
                for line in self.client.messages.batches.results(found.id):
                    if line.custom_id in custom_ids:
                        return str(found.id)
                    break  # a batch's custom ids are all ours or none
            return "unknown" if undecided else None

    def status(self, provider_batch_id: str) -> tuple[str, bool]:
        """The batch's status and whether it has ended."""
        with _mapped(self.provider):
            if self.provider == "openai":
                got = self.client.batches.retrieve(provider_batch_id)
                return str(got.status), got.status in OPENAI_ENDED
            got = self.client.messages.batches.retrieve(provider_batch_id)
            return str(got.processing_status), got.processing_status == "ended"

    def results(self, provider_batch_id: str) -> Results:
        """An ended batch's answers and errors."""
        with _mapped(self.provider):
            if self.provider == "openai":
                return self._openai_results(provider_batch_id)
            out = Results()
            for line in self.client.messages.batches.results(provider_batch_id):
                result = line.result.model_dump(mode="json")
                if result["type"] == "succeeded":
                    out.done.append((line.custom_id, result["message"]))
                elif result["type"] == "errored":
                    error = (result.get("error") or {}).get("error") or {}
                    status = ANTHROPIC_STATUS.get(str(error.get("type")), 500)
                    out.failed.append(
                        (line.custom_id, {"status": status, "message": error.get("message")})
                    )
            return out

    def _openai_results(self, provider_batch_id: str) -> Results:
        got = self.client.batches.retrieve(provider_batch_id)
        out = Results()
        if got.status == "failed":
            errors = getattr(got.errors, "data", None) or []
            text = "; ".join(str(e.message) for e in errors) or "batch failed validation"
            out.refused = (400, text)
            return out
        for file_id in (got.output_file_id, got.error_file_id):
            if not file_id:
                continue
            for raw in self.client.files.content(file_id).text.splitlines():
                if raw.strip():
                    self._openai_line(json.loads(raw), out)
        return out

    @staticmethod
    def _openai_line(record: dict[str, Any], out: Results) -> None:
        custom_id = str(record.get("custom_id"))
        response = record.get("response") or {}
        error = record.get("error") or {}
        status = int(response.get("status_code") or 0)
        if status == 200 and not error:
            out.done.append((custom_id, response.get("body")))
            return
        if error.get("code") in ("batch_expired", "batch_cancelled"):
            return  # unfinished: given back
        body = response.get("body") or {}
        message = (body.get("error") or {}).get("message") or error.get("message")
        out.failed.append((custom_id, {"status": status or 500, "message": message}))
