"""LLM calls through the official ``openai`` and ``anthropic`` SDKs.

Base URLs are settings (``OPENAI_BASE_URL``, ``ANTHROPIC_BASE_URL``), so any
OpenAI-compatible server (vLLM, llama.cpp server, Ollama) works; without an API key but
with a base URL a placeholder key is sent. The SDK timeout is ``SYNTH_LLM_TIMEOUT`` (below
the orchestration tasks' soft time limit) and the SDKs' own retries are off: the platform
retries, with its ledger, quota governor and backoff.

Errors map to the platform's:

=========================================  ===========================================
429                                        :class:`RateLimitedError` (``retry_after``)
5xx (529 overloaded too), 408, 409,        :class:`ProviderUnavailableError` (retried)
connection errors, timeouts
400, 401, 403, 404, 422 and other 4xx      :class:`ProviderRejectedError` (dead-letter)
=========================================  ===========================================

Every response's headers, errors included, go to ``on_headers`` (the quota governor learns
the provider's limits from them).
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from synth_workers.errors import (
    ProviderRejectedError,
    ProviderUnavailableError,
    RateLimitedError,
)
from synth_workers.settings import Settings

Provider = Literal["openai", "anthropic"]
PROVIDERS: tuple[Provider, ...] = ("openai", "anthropic")
HeadersHook = Callable[[Mapping[str, str]], object]


@dataclass(frozen=True)
class Completion:
    """A model's answer and the usage the provider reported."""

    text: str
    input_tokens: int
    output_tokens: int
    model: str
    headers: Mapping[str, str]
    #: Answered through the provider's batch API (``synth_workers.batchtier``): batch price.
    batch: bool = False

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


_clients: dict[tuple[Any, ...], Any] = {}
_lock = threading.Lock()


def _key(settings: Settings, provider: Provider) -> tuple[str, str | None]:
    secret = settings.openai_api_key if provider == "openai" else settings.anthropic_api_key
    base = settings.openai_base_url if provider == "openai" else settings.anthropic_base_url
    if secret is not None:
        return secret.get_secret_value(), base
    if base:
        return "no-key", base  # a local OpenAI-compatible server needs none
    name = "OPENAI_API_KEY" if provider == "openai" else "ANTHROPIC_API_KEY"
    raise ProviderRejectedError(f"{provider}: {name} is not set (nor a base URL)")


def client(settings: Settings, provider: Provider) -> Any:
    """This process's SDK client for ``provider`` (timeout set, SDK retries off)."""
    key, base = _key(settings, provider)
    cache_key = (provider, key, base, settings.llm_timeout)
    with _lock:
        found = _clients.get(cache_key)
        if found is None:
            # The SDKs are imported on first use: they take over a second to import, which a
            # worker that never runs an LLM job should not pay at start-up.
            if provider == "openai":
                import openai

                found = openai.OpenAI(
                    api_key=key, base_url=base, timeout=settings.llm_timeout, max_retries=0
                )
            else:
                import anthropic

                found = anthropic.Anthropic(
                    api_key=key, base_url=base, timeout=settings.llm_timeout, max_retries=0
                )
            _clients[cache_key] = found
    return found


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """``retry-after-ms``, else ``retry-after`` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def _lower(headers: Any) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()} if headers is not None else {}


def _status_error(provider: str, status: int, message: str, headers: dict[str, str]) -> Exception:
    text = f"{provider} {status}: {message}"
    if status == 429:
        return RateLimitedError(text, retry_after=retry_after(headers))
    if status >= 500 or status in (408, 409):
        return ProviderUnavailableError(text, status, retry_after(headers))
    return ProviderRejectedError(text, status)


def complete(
    settings: Settings,
    provider: Provider,
    model: str,
    *,
    prompt: str,
    system: str | None = None,
    max_tokens: int = 512,
    on_headers: HeadersHook | None = None,
) -> Completion:
    """One chat completion (OpenAI) or message (Anthropic); raises the platform's errors."""
    sdk = client(settings, provider)
    errors: Any = importlib.import_module(provider)  # the SDK's module: its error classes
    try:
        if provider == "openai":
            messages: list[dict[str, str]] = []
            if system:
                messages.append({"role": "system", "content": system})
            messages.append({"role": "user", "content": prompt})
            raw = sdk.chat.completions.with_raw_response.create(
                model=model, messages=messages, max_tokens=max_tokens
            )
        else:
            extra: dict[str, Any] = {"system": system} if system else {}
            raw = sdk.messages.with_raw_response.create(
                model=model,
                max_tokens=max_tokens,
                messages=[{"role": "user", "content": prompt}],
                **extra,
            )
    except errors.APIStatusError as exc:
        headers = _lower(exc.response.headers)
        if on_headers is not None:
            on_headers(headers)
        raise _status_error(provider, exc.status_code, str(exc.message), headers) from exc
    except errors.APITimeoutError as exc:
        raise ProviderUnavailableError(
            f"{provider}: no answer within {settings.llm_timeout}s"
        ) from exc
    except errors.APIConnectionError as exc:
        raise ProviderUnavailableError(f"{provider}: connection failed: {exc}") from exc
    headers = _lower(raw.headers)
    if on_headers is not None:
        on_headers(headers)
    try:
        parsed = raw.parse()
    except (errors.APIResponseValidationError, ValueError) as exc:
        raise ProviderUnavailableError(f"{provider}: malformed response: {exc}") from exc
    if provider == "openai":
        text = parsed.choices[0].message.content or "" if parsed.choices else ""
        usage = parsed.usage
        tokens_in = int(usage.prompt_tokens) if usage else 0
        tokens_out = int(usage.completion_tokens) if usage else 0
    else:
        text = "".join(getattr(b, "text", "") for b in parsed.content)
        tokens_in = int(parsed.usage.input_tokens)
        tokens_out = int(parsed.usage.output_tokens)
    return Completion(text, tokens_in, tokens_out, str(parsed.model or model), headers)


def credits(
    settings: Settings, provider: str, model: str, tokens_in: int, tokens_out: int
) -> float:
    """Credits charged for a call (``SYNTH_LLM_PRICES``: credits per 1000 tokens)."""
    prices = settings.llm_prices
    price = prices.get(f"{provider}:{model}") or prices.get(f"{provider}:*") or prices.get("*")
    if not price:
        return 0.0
    cost = tokens_in * price.get("input", 0.0) + tokens_out * price.get("output", 0.0)
    return round(cost / 1000.0, 6)
