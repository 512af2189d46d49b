"""The shared limiter and quota governor against a real Redis (no workers)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from synth_workers import app
from synth_workers.errors import RateLimitedError
from synth_workers.limits import (
    QuotaGovernor,
    QuotaLimit,
    Reservation,
    SlidingWindow,
    acquire,
    parse_reset,
    rate_headers,
)


def test_sliding_window_is_exact_across_threads(rclient: Any) -> None:
    limiter = SlidingWindow(app.redis, "t-exact", limit=5, window=0.5, hold=5)
    grants: list[float] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(5):
            r = acquire(limiter, max_wait=10)
            with lock:
                grants.append(time.time())
            r.release()

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    grants.sort()
    assert len(grants) == 30
    peak = max(sum(1 for g in grants if s <= g < s + 0.5) for s in grants)
    assert peak <= 5
    assert grants[-1] - grants[0] >= 2.5 - 0.05  # 30 calls at 5 per 0.5 s


def test_in_flight_calls_count_until_released_or_held_out(rclient: Any) -> None:
    limiter = SlidingWindow(app.redis, "t-flight", limit=1, window=0.2, hold=0.6)
    first = limiter.try_reserve()
    assert isinstance(first, Reservation)
    time.sleep(0.3)  # longer than the window: still in flight, still counted
    assert not isinstance(limiter.try_reserve(), Reservation)
    time.sleep(0.6)  # its holder "died": the hold ran out (plus the window)
    assert isinstance(limiter.try_reserve(), Reservation)


def test_tokens_are_reserved_and_reconciled(rclient: Any) -> None:
    limiter = SlidingWindow(app.redis, "t-tokens", limit=None, token_limit=100, window=30)
    first = limiter.try_reserve(60)
    assert isinstance(first, Reservation)
    assert not isinstance(limiter.try_reserve(60), Reservation)
    first.release(10)  # the provider reported 10 tokens, not the 60 estimated
    assert isinstance(limiter.try_reserve(60), Reservation)


def test_block_and_acquire_raise_for_long_waits(rclient: Any) -> None:
    limiter = SlidingWindow(app.redis, "t-block", limit=100, window=1)
    assert limiter.block(3.0) == pytest.approx(3.0, abs=0.1)
    assert limiter.block(1.0) == pytest.approx(3.0, abs=0.1)  # never shortened
    wait = limiter.try_reserve()
    assert isinstance(wait, float) and 2.8 < wait <= 3.0
    with pytest.raises(RateLimitedError) as caught:
        acquire(limiter, max_wait=0.5)
    assert caught.value.retry_after is not None and caught.value.retry_after > 2.5


def test_rate_headers_of_both_providers() -> None:
    assert parse_reset("6m0s") == 360
    assert parse_reset("20ms") == pytest.approx(0.02)
    assert parse_reset("1.5s") == 1.5
    assert parse_reset("2") == 2
    now = time.time()
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now + 30))
    assert 28 <= (parse_reset(iso, now) or 0) <= 31
    o = rate_headers(
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-limit-tokens": "1000",
        }
    )
    assert (o.limit_requests, o.remaining_requests, o.reset_requests) == (60, 0, 1.0)
    assert o.limit_tokens == 1000
    a = rate_headers(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": iso,
            "anthropic-ratelimit-tokens-remaining": "900",
        }
    )
    assert (a.limit_requests, a.remaining_requests) == (50, 0)
    assert a.reset_requests is not None and 25 < a.reset_requests <= 31
    assert a.remaining_tokens == 900


def test_governor_learns_limits_and_pauses_from_headers(rclient: Any) -> None:
    gov = QuotaGovernor(app.redis, window=60, default=QuotaLimit(requests=100))
    gov.learn("openai", "m", {"x-ratelimit-limit-requests": "3"})  # lower than ours
    for _ in range(3):
        assert isinstance(gov.limiter("openai", "m").try_reserve(), Reservation)
    assert not isinstance(gov.limiter("openai", "m").try_reserve(), Reservation)
    gov.learn(
        "anthropic",
        "c",
        {"anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-requests-reset": "2"},
    )
    wait = gov.limiter("anthropic", "c").try_reserve()
    assert isinstance(wait, float) and 1.5 < wait <= 2.0
    assert gov.limit_for("x", "y") == QuotaLimit(requests=100)
