"""The batch tier's settings: environment variables ``SYNTH_BATCH_*`` (a section of
:class:`synth_workers.settings.Settings`, ``settings.batch``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

BatchLimitName = Literal["batches", "requests", "tokens"]


class BatchSettings(BaseSettings):
    """When deferrable requests are sent as batches, how they are polled, what they cost."""

    model_config = SettingsConfigDict(env_prefix="SYNTH_BATCH_", extra="ignore")

    enabled: bool = Field(
        default=True,
        description="SYNTH_BATCH_ENABLED: run the batch tier (collect, submit, poll, apply) in "
        "each worker's main process; off: deferrable jobs wait until a worker runs it.",
    )
    max_items: int = Field(
        default=1000,
        ge=1,
        le=50_000,
        description="SYNTH_BATCH_MAX_ITEMS: a (provider, model) batch is sent once this many "
        "requests wait, and holds at most this many.",
    )
    max_age: float = Field(
        default=300.0,
        ge=0,
        description="SYNTH_BATCH_MAX_AGE: seconds the oldest waiting request may wait before "
        "a smaller batch is sent.",
    )
    tick: float = Field(
        default=1.0,
        gt=0,
        description="SYNTH_BATCH_TICK: seconds between two looks at waiting requests.",
    )
    poll_interval: float = Field(
        default=30.0,
        gt=0,
        description="SYNTH_BATCH_POLL_INTERVAL: seconds between two status requests per open "
        "batch.",
    )
    apply_chunk: int = Field(
        default=100,
        ge=1,
        description="SYNTH_BATCH_APPLY_CHUNK: results written back (and jobs resumed) per "
        "transaction.",
    )
    lease: float = Field(
        default=600.0,
        gt=0,
        description="SYNTH_BATCH_LEASE: seconds a process owns a batch it submits or applies; "
        "after that another process recovers it (the first one died). Keep it above two "
        "SDK timeouts (a file upload and a batch creation), or a slow submission is looked "
        "up before it has finished.",
    )
    deadline: float = Field(
        default=172_800.0,
        gt=0,
        description="SYNTH_BATCH_DEADLINE: seconds a deferrable job may take in all. A request "
        "an expired or cancelled batch gives back joins the next batch while more than "
        "SYNTH_BATCH_WINDOW of it is left, else it is sent online.",
    )
    window: float = Field(
        default=86_400.0,
        gt=0,
        description="SYNTH_BATCH_WINDOW: the providers' completion window (24 h).",
    )
    price_factor: float = Field(
        default=0.5,
        ge=0,
        description="SYNTH_BATCH_PRICE_FACTOR: batch price as a share of SYNTH_LLM_PRICES.",
    )
    limits: dict[str, dict[BatchLimitName, int]] = Field(
        default_factory=dict,
        description='SYNTH_BATCH_LIMITS: JSON per "provider:model" or "provider:*": batches '
        "sent per SYNTH_LLM_QUOTA_WINDOW, and requests and tokens in open batches at once "
        '(the providers\' batch queue limits), e.g. {"openai:*": {"tokens": 2000000}}.',
    )

    def limit(self, provider: str, model: str) -> dict[BatchLimitName, int]:
        """The batch limits of (provider, model); empty: none."""
        return self.limits.get(f"{provider}:{model}") or self.limits.get(f"{provider}:*") or {}
