"""LLM calls from jobs: under the shared quota governor, with 429 re-scheduling the job
without using an attempt, and the usage (tokens, credits) recorded and announced.

Used by ``tasks.orchestration``; kept apart so that any job kind calling a model shares them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from synth_workers.batchtier import collector
from synth_workers.errors import RateLimitedError
from synth_workers.limits import QuotaGovernor, QuotaLimit, estimate_tokens
from synth_workers.providers import llm
from synth_workers.providers.llm import Completion, Provider
from synth_workers.task import Task

if TYPE_CHECKING:
    from synth_workers.app import SynthCelery

# --- LLM calls under the shared quota -----------------------------------------------------

_governors: dict[int, QuotaGovernor] = {}


def governor(app: SynthCelery) -> QuotaGovernor:
    """This process's quota governor (settings: SYNTH_LLM_QUOTA_WINDOW, _REQUESTS_PER_WINDOW,
    _TOKENS_PER_WINDOW, SYNTH_LLM_QUOTAS)."""
    found = _governors.get(id(app))
    if found is None:
        s = app.settings
        found = _governors[id(app)] = QuotaGovernor(
            app.redis,
            window=s.llm_quota_window,
            default=QuotaLimit(s.llm_requests_per_window, s.llm_tokens_per_window),
            overrides={
                k: QuotaLimit(v.get("requests"), v.get("tokens")) for k, v in s.llm_quotas.items()
            },
            hold=s.llm_timeout + 5,
        )
    return found


def call_llm(
    task: Task,
    provider: Provider,
    model: str,
    *,
    prompt: str,
    system: str | None,
    max_tokens: int,
) -> Completion:
    """Reserve quota, call the model, reconcile the quota with the reported usage. A 429, or
    a quota wait longer than SYNTH_LIMIT_MAX_INLINE_WAIT, re-schedules the job (no attempt).
    A deferrable job gets its batch's answer instead (its first run parks it: see
    ``synth_workers.batchtier``), outside the online quota."""
    batched = collector.chat(
        task, provider, model, prompt=prompt, system=system, max_tokens=max_tokens
    )
    if batched is not None:
        return batched
    app = task.synth_app
    settings = app.settings
    quota = governor(app)
    estimate = estimate_tokens(prompt, system or "", max_output=max_tokens)
    try:
        reservation = quota.reserve(provider, model, estimate, settings.limit_max_inline_wait)
    except RateLimitedError as exc:
        task.defer(exc.retry_after or 1.0, "llm_quota", capped=False)
    used: int | None = None
    try:
        completion = llm.complete(
            settings,
            provider,
            model,
            prompt=prompt,
            system=system,
            max_tokens=max_tokens,
            on_headers=lambda headers: quota.learn(provider, model, headers),
        )
        used = completion.total_tokens
    except RateLimitedError as exc:
        wait = quota.block(provider, model, exc.retry_after or 1.0)
        task.defer(wait, "llm_429")
    finally:
        quota.reconcile(reservation, used)
    return completion


@dataclass(frozen=True)
class Usage:
    provider: str
    model: str
    input_tokens: int
    output_tokens: int
    credits: float

    def data(self, workflow_id: str | None) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "model": self.model,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "credits": self.credits,
            "workflow_id": workflow_id,
        }


def usage_of(task: Task, provider: str, model: str, completion: Completion) -> Usage:
    """Tokens and credits of a call; a batch's answer at the batch price."""
    settings = task.synth_app.settings
    cost = llm.credits(settings, provider, model, completion.input_tokens, completion.output_tokens)
    if completion.batch:
        cost = round(cost * settings.batch.price_factor, 6)
    return Usage(provider, model, completion.input_tokens, completion.output_tokens, cost)


def record_usage(
    conn: psycopg.Connection[Any],
    job_id: str,
    user_id: str | None,
    workflow_id: str | None,
    usage: Usage,
) -> None:
    conn.execute(
        "INSERT INTO synth_usage (job_id, user_id, workflow_id, provider, model, input_tokens,"
        " output_tokens, credits) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (job_id) DO NOTHING",
        (
            job_id,
            user_id,
            workflow_id,
            usage.provider,
            usage.model,
            usage.input_tokens,
            usage.output_tokens,
            usage.credits,
        ),
    )


def announce_usage(task: Task, user_id: str | None, workflow_id: str, usage: Usage) -> None:
    task.synth_app.lifecycle.announce(
        "usage",
        task.request.id or "direct",
        task=task.name,
        queue="orchestration",
        user_id=user_id,
        data=usage.data(workflow_id),
    )
