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
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from synth_workers.errors import ConfigurationError

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
MailBackend = Literal["file", "console"]

_REDIS_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")
_POSTGRES_SCHEMES = ("postgresql", "postgres")
_URL_FIELDS = ("redis_url", "result_backend_url", "database_url", "qdrant_url")


def mask_url(url: str | None) -> str | None:
    """Return ``url`` with any password replaced by ``***``."""
    if not url:
        return url
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}{port}", parts.path, parts.query, ""))


def _check_scheme(url: str | None, schemes: tuple[str, ...]) -> str | None:
    if url is None or url == "":
        return None
    scheme = urlsplit(url).scheme
    if scheme not in schemes:
        allowed = ", ".join(schemes)
        raise ValueError(f"URL scheme must be one of {allowed}, got {scheme or 'none'!r}")
    return url


class Settings(BaseSettings):
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
    max_payload_bytes: int = Field(
        default=256 * 1024, ge=1, description="SYNTH_MAX_PAYLOAD_BYTES: payload cap at enqueue."
    )
    idempotency_window: int = Field(
        default=24 * 3600, ge=1, description="SYNTH_IDEMPOTENCY_WINDOW: seconds a key dedupes."
    )
    job_ttl: int = Field(
        default=7 * 24 * 3600, ge=60, description="SYNTH_JOB_TTL: seconds job records are kept."
    )
    visibility_timeout: int = Field(
        default=3600, ge=1, description="SYNTH_VISIBILITY_TIMEOUT: Redis transport redelivery."
    )
    worker_prefetch_multiplier: int = Field(
        default=1, ge=1, description="SYNTH_WORKER_PREFETCH_MULTIPLIER: 1 keeps priorities strict."
    )
    db_schema: str = Field(
        default="synth",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="SYNTH_DB_SCHEMA: Postgres schema of the ledger's tables.",
    )
    db_pool_size: int = Field(
        default=4, ge=1, le=100, description="SYNTH_DB_POOL_SIZE: connections per process."
    )
    lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="SYNTH_LEASE_SECONDS: a running job's lease; renewed "
        "every third of it, reaped when it expires.",
    )
    sweep_interval: float = Field(
        default=1.0,
        gt=0,
        description="SYNTH_SWEEP_INTERVAL: seconds between ledger sweeps "
        "(due delays and retries, expired leases, outbox).",
    )
    reconcile_grace: float = Field(
        default=15.0,
        ge=0,
        description="SYNTH_RECONCILE_GRACE: a queued job absent from Redis "
        "this long after its publish is published again.",
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
    mail_backend: MailBackend = Field(
        default="file",
        description="SYNTH_MAIL_BACKEND: file (an .eml per message in SYNTH_MAIL_OUTBOX) or "
        "console.",
    )
    mail_outbox: Path = Field(
        default=Path("outbox"), description="SYNTH_MAIL_OUTBOX: folder of the file backend."
    )
    mail_from: str = Field(default="no-reply@localhost", description="SYNTH_MAIL_FROM")

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
        description="SYNTH_EVENTS_RETENTION: seconds a job's event stream lives after the job "
        "ends (a user's stream: after its last event).",
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
    # --- end events ---------------------------------------------------------------------------

    @field_validator("redis_url", "result_backend_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        return _check_scheme(value, _REDIS_SCHEMES)

    @field_validator("database_url")
    @classmethod
    def _postgres_scheme(cls, value: str | None) -> str | None:
        return _check_scheme(value, _POSTGRES_SCHEMES)

    @field_validator("qdrant_url")
    @classmethod
    def _qdrant_scheme(cls, value: str | None) -> str | None:
        return _check_scheme(value, ("http", "https"))

    @field_validator("include", "dlq_digest_to", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

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


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (plus ``overrides``); raise ``ConfigurationError`` on a bad value."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"{env_name(field)}: {err['msg']}")
        raise ConfigurationError("invalid configuration: " + "; ".join(problems)) from None
