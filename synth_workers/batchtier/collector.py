"""The task side of the batch tier: a deferrable job's request is parked here, and its next
run reads what came back.

A job is deferrable when it was sent with ``enqueue(..., deferrable=True)`` (or
``apply_async(synth_deferrable=True)``; the message header ``synth_deferrable``) or its task
sets ``deferrable = True``. Its first run records the request and parks the job
(:func:`synth_workers.ledger.batches.park`) instead of calling the provider; once the batch
answered, the job runs again and :func:`chat` / :func:`embed` return the stored answer, so
the task's own code (usage, effects, fan-in) runs unchanged, once, under the ledger's fence.
A request the provider refused comes back as the error the online call would have raised
(retried or dead-lettered by the job's policy); a request sent back online returns ``None``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from synth_workers.errors import ProviderRejectedError, ProviderUnavailableError
from synth_workers.ledger import batches as store
from synth_workers.limits import estimate_tokens
from synth_workers.providers.llm import Completion
from synth_workers.runner import LeaseLostError, ParkedInBatch
from synth_workers.states import EventKind

if TYPE_CHECKING:
    from synth_workers.task import Task

#: The message header that marks a job deferrable.
HEADER = "synth_deferrable"


def deferrable(task: Task) -> bool:
    """Whether the running job may wait for a batch."""
    if task.claim is None or not task.platform.settings.batch.enabled:
        return False
    return bool(getattr(task.request, HEADER, False) or getattr(task, "deferrable", False))


def _error(item: store.Item) -> Exception:
    result = item.result if isinstance(item.result, dict) else {}
    status = int(result.get("status") or 500)
    text = f"{item.provider} batch {status}: {result.get('message') or 'error'}"
    if status >= 500 or status in (408, 409, 429):
        return ProviderUnavailableError(text, status)
    return ProviderRejectedError(text, status)


def _answer(
    task: Task, provider: str, model: str, kind: str, request: dict[str, Any], tokens: int
) -> Any:
    """The stored answer (a response body), ``None`` to go online, or park the job."""
    claim = task.claim
    assert claim is not None
    ledger = task.platform.ledger
    item = store.item_of(ledger, claim.job_id)
    if item is not None and item.state == "done":
        return item.result
    if item is not None and item.state == "online":
        return None
    if item is not None and item.state == "failed":
        store.forget(ledger, claim.job_id)  # the next attempt sends a new request
        raise _error(item)
    if not store.park(ledger, claim, provider, model, kind, request, tokens):
        ledger.record_late(claim, "parked")
        raise LeaseLostError(f"job {claim.job_id} attempt {claim.attempt} lost")
    ledger.announce_finish(
        claim, EventKind.SCHEDULED, reason="batch", provider=provider, model=model
    )
    raise ParkedInBatch(claim.job_id)


def chat(
    task: Task,
    provider: str,
    model: str,
    *,
    prompt: str,
    system: str | None,
    max_tokens: int,
) -> Completion | None:
    """The batch's answer to this chat request; ``None``: not deferrable (or sent back
    online), call the provider now. Parks the job when no answer is there yet."""
    if not deferrable(task):
        return None
    if provider == "openai":
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": prompt})
        request: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}
    else:
        request = {
            "model": model,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}],
        }
        if system:
            request["system"] = system
    tokens = estimate_tokens(prompt, system or "", max_output=max_tokens)
    body = _answer(task, provider, model, "chat", request, tokens)
    if body is None:
        return None
    return completion_of(provider, model, body)


def completion_of(provider: str, model: str, body: dict[str, Any]) -> Completion:
    """A :class:`Completion` from a batch result's response body."""
    usage = body.get("usage") or {}
    if provider == "openai":
        choices = body.get("choices") or [{}]
        text = str((choices[0].get("message") or {}).get("content") or "")
        tokens_in, tokens_out = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    else:
        text = "".join(str(b.get("text", "")) for b in body.get("content") or [])
        tokens_in, tokens_out = usage.get("input_tokens", 0), usage.get("output_tokens", 0)
    return Completion(
        text, int(tokens_in), int(tokens_out), str(body.get("model") or model), {}, batch=True
    )


def embed(task: Task, model: str, texts: list[str]) -> tuple[list[list[float]], int] | None:
    """The batch's vectors for ``texts`` (OpenAI embeddings) and the tokens it reported;
    ``None``: not deferrable (or sent back online), embed now. Parks the job when no answer
    is there yet."""
    if not deferrable(task) or not texts:
        return None
    request = {"model": model, "input": texts, "encoding_format": "float"}
    body = _answer(task, "openai", model, "embeddings", request, estimate_tokens(*texts))
    if body is None:
        return None
    data = sorted(body.get("data") or [], key=lambda d: int(d.get("index", 0)))
    if len(data) != len(texts):
        raise ProviderUnavailableError(
            f"embeddings batch: asked for {len(texts)} vectors, got {len(data)}"
        )
    tokens = int((body.get("usage") or {}).get("prompt_tokens") or 0)
    return [[float(x) for x in d["embedding"]] for d in data], tokens
