"""Rate limits shared by every worker on every host, kept in Redis (not Celery's per-worker
``rate_limit``).

:class:`SlidingWindow` is an exact sliding-window log: a Lua script (atomic, clocked by
Redis ``TIME`` so worker clocks do not matter) grants a call only while fewer than
``limit`` calls — and, optionally, fewer than ``token_limit`` tokens — were granted in the
last ``window`` seconds. A granted call is counted *in flight* until the caller releases it
(its entry is stamped with the release time, so it keeps counting a full window after the
call ended) or, when the caller dies, until ``hold`` seconds (the client's timeout) pass.
Because every entry's stamp is no earlier than the moment the provider saw the request, the
provider sees at most ``limit`` requests in any ``window``-second span.

:class:`QuotaGovernor` applies that per (provider, model) for LLM calls: requests and tokens
per window, an estimate reserved before the call and reconciled with the usage the provider
reports, and what the provider's rate-limit headers say (a lower limit than configured, no
requests left until a reset, a 429's Retry-After) shared with every worker.

:func:`acquire` waits in process for a short wait and raises :class:`RateLimitedError` for a
longer one, so that the task re-schedules the job in the ledger without burning an attempt.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import redis

from synth_workers.errors import RateLimitedError

PREFIX = "synth:limit:"

# KEYS: log (zset member -> stamp), tokens (hash member -> tokens), block (string: unix time
# until which nothing is granted), learned (hash: requests / tokens limits from headers).
# ARGV: request limit (0: none), token limit (0: none), window, member, tokens, hold.
# Returns {1, now} when granted, {0, seconds to wait} when not (as strings: Lua numbers
# would be truncated to integers).
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lim_req = tonumber(ARGV[1])
local lim_tok = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local cost = tonumber(ARGV[5])
local hold = tonumber(ARGV[6])
local blocked = tonumber(redis.call('GET', KEYS[3]) or '0')
if blocked > now then
  return {0, tostring(blocked - now)}
end
local learned_req = tonumber(redis.call('HGET', KEYS[4], 'requests') or '0')
if learned_req > 0 and (lim_req == 0 or learned_req < lim_req) then lim_req = learned_req end
local learned_tok = tonumber(redis.call('HGET', KEYS[4], 'tokens') or '0')
if learned_tok > 0 and (lim_tok == 0 or learned_tok < lim_tok) then lim_tok = learned_tok end
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - window, 'LIMIT', 0, 5000)
for i = 1, #old, 500 do
  local chunk = {unpack(old, i, math.min(i + 499, #old))}
  redis.call('ZREM', KEYS[1], unpack(chunk))
  redis.call('HDEL', KEYS[2], unpack(chunk))
end
local n = redis.call('ZCARD', KEYS[1])
if lim_req > 0 and n >= lim_req then
  local e = redis.call('ZRANGE', KEYS[1], n - lim_req, n - lim_req, 'WITHSCORES')
  return {0, tostring(tonumber(e[2]) + window - now)}
end
if lim_tok > 0 and n > 0 then
  local used = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[2])) do used = used + tonumber(v) end
  if used + cost > lim_tok then
    local need = used + cost - lim_tok
    local freed = 0
    local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      freed = freed + tonumber(redis.call('HGET', KEYS[2], entries[i]) or '0')
      if freed >= need then
        return {0, tostring(tonumber(entries[i + 1]) + window - now)}
      end
    end
    return {0, tostring(window)}
  end
end
redis.call('ZADD', KEYS[1], now + hold, ARGV[4])
redis.call('HSET', KEYS[2], ARGV[4], cost)
local ttl = math.ceil((window + hold) * 1000) + 1000
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return {1, tostring(now)}
"""

# KEYS: log, tokens. ARGV: member, tokens (-1: keep the estimate), window.
# The call is over: stamp its entry with now (it counts for one more window from here).
_RELEASE = """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1])
if tonumber(ARGV[2]) >= 0 then redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end
return 1
"""

# KEYS: block. ARGV: seconds. Nothing is granted for ``seconds`` from now (never shortened).
_BLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local target = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if target > current then
  redis.call('SET', KEYS[1], tostring(target), 'PX', math.ceil(tonumber(ARGV[1]) * 1000) + 1)
end
return tostring(math.max(target, current) - now)
"""


@dataclass(frozen=True)
class Reservation:
    """A granted call: release it (with the tokens it really used) once it is over."""

    limiter: SlidingWindow
    member: str
    tokens: int

    def release(self, tokens: int | None = None) -> None:
        self.limiter.release(self, tokens)


class SlidingWindow:
    """At most ``limit`` calls (and ``token_limit`` tokens) per ``window`` seconds, across
    every process that uses the same Redis and ``name``."""

    def __init__(
        self,
        client: redis.Redis,
        name: str,
        *,
        limit: int | None,
        window: float,
        token_limit: int | None = None,
        hold: float = 60.0,
    ) -> None:
        self.client = client
        self.name = name
        self.limit = limit
        self.window = window
        self.token_limit = token_limit
        #: Seconds an entry stays in flight when its caller never releases it (dies).
        self.hold = hold
        base = PREFIX + name
        self.keys = [f"{base}:log", f"{base}:tokens", f"{base}:block", f"{base}:learned"]
        self._reserve = client.register_script(_RESERVE)
        self._release = client.register_script(_RELEASE)
        self._block = client.register_script(_BLOCK)

    def try_reserve(self, tokens: int = 0) -> Reservation | float:
        """A reservation, or the seconds to wait before it can be granted."""
        member = uuid.uuid4().hex
        granted, value = self._reserve(
            keys=self.keys,
            args=[
                self.limit or 0,
                self.token_limit or 0,
                self.window,
                member,
                max(0, tokens),
                self.hold,
            ],
        )
        if int(granted) == 1:
            return Reservation(self, member, max(0, tokens))
        return max(0.01, float(value))

    def release(self, reservation: Reservation, tokens: int | None = None) -> None:
        self._release(
            keys=self.keys[:2], args=[reservation.member, -1 if tokens is None else tokens]
        )

    def block(self, seconds: float) -> float:
        """Grant nothing for ``seconds`` (a provider's Retry-After); returns the wait."""
        return float(self._block(keys=[self.keys[2]], args=[max(0.0, seconds)]))

    def learn_limits(self, requests: int | None = None, tokens: int | None = None) -> None:
        """Limits the provider announced (per window); the lower of these and ours applies."""
        pairs = [(k, v) for k, v in (("requests", requests), ("tokens", tokens)) if v]
        if pairs:
            with self.client.pipeline() as pipe:
                for k, v in pairs:
                    pipe.hset(self.keys[3], k, v)
                pipe.expire(self.keys[3], 3600)
                pipe.execute()

    def in_window(self) -> int:
        """Calls counted now (in flight or ended within the window)."""
        return int(self.client.zcard(self.keys[0]))


def acquire(limiter: SlidingWindow, tokens: int = 0, max_wait: float = 5.0) -> Reservation:
    """Wait (at most ``max_wait`` seconds in all) for a reservation; beyond that raise
    :class:`RateLimitedError` with the wait, for the task to re-schedule the job."""
    deadline = time.monotonic() + max_wait
    while True:
        outcome = limiter.try_reserve(tokens)
        if isinstance(outcome, Reservation):
            return outcome
        remaining = deadline - time.monotonic()
        if outcome > remaining:
            raise RateLimitedError(
                f"shared limit {limiter.name!r} reached; retry in {outcome:.2f}s",
                retry_after=outcome,
            )
        time.sleep(outcome)


# --- the LLM quota governor ---------------------------------------------------------------


@dataclass(frozen=True)
class RateHeaders:
    """What a provider's rate-limit headers said (requests and tokens)."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_reset(value: str | None, now: float | None = None) -> float | None:
    """Seconds until a reset: ``"6m0s"``/``"20ms"`` (OpenAI), a number of seconds, or an
    RFC 3339 time (Anthropic)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if parts and "".join(n + u for n, u in parts) == value:
        scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
        return sum(float(n) * scale[u] for n, u in parts)
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, moment.timestamp() - (time.time() if now is None else now))


def _int(headers: Mapping[str, str], name: str) -> int | None:
    raw = headers.get(name)
    try:
        return int(float(raw)) if raw is not None else None
    except ValueError:
        return None


def rate_headers(headers: Mapping[str, str]) -> RateHeaders:
    """Read OpenAI's ``x-ratelimit-*`` or Anthropic's ``anthropic-ratelimit-*`` headers."""
    h = {k.lower(): v for k, v in headers.items()}
    if any(k.startswith("anthropic-ratelimit-") for k in h):
        p = "anthropic-ratelimit-"
        return RateHeaders(
            _int(h, p + "requests-limit"),
            _int(h, p + "requests-remaining"),
            parse_reset(h.get(p + "requests-reset")),
            _int(h, p + "tokens-limit"),
            _int(h, p + "tokens-remaining"),
            parse_reset(h.get(p + "tokens-reset")),
        )
    p = "x-ratelimit-"
    return RateHeaders(
        _int(h, p + "limit-requests"),
        _int(h, p + "remaining-requests"),
        parse_reset(h.get(p + "reset-requests")),
        _int(h, p + "limit-tokens"),
        _int(h, p + "remaining-tokens"),
        parse_reset(h.get(p + "reset-tokens")),
    )


@dataclass(frozen=True)
class QuotaLimit:
    """Requests and tokens per window for one (provider, model); ``None``: unlimited."""

    requests: int | None = None
    tokens: int | None = None


class QuotaGovernor:
    """Requests and tokens per window per (provider, model), shared by all workers."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        window: float = 60.0,
        default: QuotaLimit | None = None,
        overrides: Mapping[str, QuotaLimit] | None = None,
        hold: float = 60.0,
    ) -> None:
        self.client = client
        self.window = window
        self.default = default or QuotaLimit()
        self.overrides = dict(overrides or {})
        self.hold = hold
        self._limiters: dict[tuple[str, str], SlidingWindow] = {}

    def limit_for(self, provider: str, model: str) -> QuotaLimit:
        return (
            self.overrides.get(f"{provider}:{model}")
            or self.overrides.get(f"{provider}:*")
            or self.default
        )

    def limiter(self, provider: str, model: str) -> SlidingWindow:
        key = (provider, model)
        if key not in self._limiters:
            limit = self.limit_for(provider, model)
            self._limiters[key] = SlidingWindow(
                self.client,
                f"llm:{provider}:{model}",
                limit=limit.requests,
                token_limit=limit.tokens,
                window=self.window,
                hold=self.hold,
            )
        return self._limiters[key]

    def reserve(
        self, provider: str, model: str, estimate: int, max_wait: float = 5.0
    ) -> Reservation:
        """Reserve one request and ``estimate`` tokens (waits, or raises RateLimitedError)."""
        return acquire(self.limiter(provider, model), estimate, max_wait)

    def reconcile(self, reservation: Reservation, used_tokens: int | None) -> None:
        """The call is over: count the tokens the provider reported instead of the estimate."""
        reservation.release(used_tokens)

    def learn(self, provider: str, model: str, headers: Mapping[str, str]) -> RateHeaders:
        """Take in the provider's rate-limit headers: its limits (scaled from per-minute to
        our window), and a pause until the reset when nothing is left."""
        info = rate_headers(headers)
        limiter = self.limiter(provider, model)
        scale = self.window / 60.0

        def scaled(value: int | None) -> int | None:
            return max(1, math.floor(value * scale)) if value else None

        limiter.learn_limits(scaled(info.limit_requests), scaled(info.limit_tokens))
        pauses = [
            reset
            for remaining, reset in (
                (info.remaining_requests, info.reset_requests),
                (info.remaining_tokens, info.reset_tokens),
            )
            if remaining is not None and remaining <= 0 and reset
        ]
        if pauses:
            limiter.block(max(pauses))
        return info

    def block(self, provider: str, model: str, seconds: float) -> float:
        """A 429 said wait ``seconds``: every worker waits, not only this one."""
        return self.limiter(provider, model).block(seconds)

    def batch_limiter(self, provider: str, model: str, batches: int | None) -> SlidingWindow:
        """Batch submissions per window for (provider, model): the provider's batch limit,
        counted apart from the online requests and tokens, which a batch never uses."""
        key = (f"batch:{provider}", model)
        if key not in self._limiters:
            self._limiters[key] = SlidingWindow(
                self.client, f"batch:{provider}:{model}", limit=batches, window=self.window
            )
        return self._limiters[key]


def estimate_tokens(*texts: str, max_output: int = 0) -> int:
    """A cheap upper-ish estimate: ~4 characters per token, plus the output allowance."""
    return sum(len(t) for t in texts) // 4 + 1 + max_output


def as_mapping(headers: Any) -> dict[str, str]:
    """Headers of any client (httpx, urllib) as a plain lower-cased dict."""
    items = headers.items() if hasattr(headers, "items") else headers or ()
    return {str(k).lower(): str(v) for k, v in items}
