"""The operations guide's connection variables, as the guide writes them.

A base of :class:`~synth_workers.settings.Settings` (one settings object; this module only
keeps ``settings.py`` short): ``DB_POOL_MIN``, ``DB_IDLE_TIMEOUT`` (milliseconds),
``SYNTH_DB_CONNECT_TIMEOUT``, ``SENTRY_ENVIRONMENT`` and ``XDG_RUNTIME_DIR`` (where
``synth-workers dev`` records its stack); ``DB_POOL_MAX`` is ``SYNTH_DB_POOL_SIZE``'s name
there. :func:`redis_tls_url` turns the guide's ``REDIS_URL=redis://:password@host:6379/0?ssl=true``
into the ``rediss://`` URL that redis-py, kombu and Celery's result backend understand.

The Redis Sentinel and TLS variables are read here too; :mod:`synth_workers.redisconn` builds
every Redis client from them.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def redis_tls_url(url: str) -> str:
    """``url`` with the guide's ``ssl=true`` query made a ``rediss://`` URL, and every
    ``rediss://`` URL given ``ssl_cert_reqs=required`` unless it says otherwise (Celery's
    result backend refuses a ``rediss://`` URL without it; required verifies the server's
    certificate). The password and every other parameter are kept. ``ValueError`` for an
    ``ssl`` value that is not a boolean, or ``ssl=false`` on a ``rediss://`` URL."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    flags = [value.lower() for key, value in query if key.lower() == "ssl"]
    rest = [(key, value) for key, value in query if key.lower() != "ssl"]
    scheme = parts.scheme
    if flags:
        flag = flags[-1]
        if flag in _TRUE:
            if scheme not in ("redis", "rediss"):
                raise ValueError(f"ssl=true needs a redis:// URL, got {scheme}://")
            scheme = "rediss"
        elif flag in _FALSE:
            if scheme == "rediss":
                raise ValueError("ssl=false contradicts rediss://")
        else:
            raise ValueError(f"ssl must be true or false, got {flag!r}")
    if scheme == "rediss" and not any(key == "ssl_cert_reqs" for key, _ in rest):
        rest.append(("ssl_cert_reqs", "required"))
    if not flags and scheme == parts.scheme and len(rest) == len(query):
        return url
    return urlunsplit((scheme, parts.netloc, parts.path, urlencode(rest), parts.fragment))


class ConnectionSettings(BaseSettings):
    """The guide's pool, timeout and environment variables (fields of ``Settings``)."""

    db_pool_min: int = Field(
        default=1,
        ge=0,
        le=100,
        validation_alias=AliasChoices("DB_POOL_MIN", "SYNTH_DB_POOL_MIN", "db_pool_min"),
        description="DB_POOL_MIN: ledger connections each process keeps open (at most "
        "DB_POOL_MAX).",
    )
    db_idle_timeout: int = Field(
        default=600_000,
        ge=1000,
        validation_alias=AliasChoices(
            "DB_IDLE_TIMEOUT", "SYNTH_DB_IDLE_TIMEOUT", "db_idle_timeout"
        ),
        description="DB_IDLE_TIMEOUT: milliseconds a ledger connection above DB_POOL_MIN may "
        "stay unused before the pool closes it (at least 1000).",
    )
    db_connect_timeout: int = Field(
        default=5,
        ge=1,
        le=300,
        description="SYNTH_DB_CONNECT_TIMEOUT: seconds to connect to Postgres; an unreachable "
        "Postgres fails enqueue and the CLI within it (libpq waits at least 2 s).",
    )
    sentry_environment: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SENTRY_ENVIRONMENT", "sentry_environment"),
        description="SENTRY_ENVIRONMENT: the environment Sentry files events under "
        "(production, staging); unset: sentry-sdk's default.",
    )
    runtime_dir: str | None = Field(
        default=None,
        validation_alias=AliasChoices("XDG_RUNTIME_DIR", "runtime_dir"),
        description="XDG_RUNTIME_DIR: where `synth-workers dev` records its stack for other "
        "shells (unset: a private folder in the temporary directory).",
    )

    # --- Redis Sentinel and TLS (see the module docstring) ---------------------------------
    redis_sentinel_name: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "REDIS_SENTINEL_NAME", "SYNTH_REDIS_SENTINEL_NAME", "redis_sentinel_name"
        ),
        description="REDIS_SENTINEL_NAME: the master's name the sentinels watch (`sentinel "
        "monitor NAME ...`); set, REDIS_URL lists the sentinels (redis://s1:26379,s2:26379/0 "
        "or sentinel://s1:26379;sentinel://s2:26379).",
    )
    redis_sentinel_password: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "REDIS_SENTINEL_PASSWORD", "SYNTH_REDIS_SENTINEL_PASSWORD", "redis_sentinel_password"
        ),
        description="REDIS_SENTINEL_PASSWORD: the sentinels' own password (their "
        "requirepass); the master's is REDIS_URL's. Unset: sentinels without one.",
    )
    redis_ssl_ca_certs: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_SSL_CA_CERTS", "redis_ssl_ca_certs"),
        description="REDIS_SSL_CA_CERTS: CA bundle (PEM file) that verifies Redis's TLS "
        "certificate (rediss:// or ?ssl=true). Unset: the system's CAs.",
    )
    redis_ssl_certfile: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_SSL_CERTFILE", "redis_ssl_certfile"),
        description="REDIS_SSL_CERTFILE: client certificate (PEM) for a Redis that checks "
        "clients (tls-auth-clients yes).",
    )
    redis_ssl_keyfile: str | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_SSL_KEYFILE", "redis_ssl_keyfile"),
        description="REDIS_SSL_KEYFILE: the client certificate's private key (PEM).",
    )
    redis_ssl_cert_reqs: Literal["required", "optional", "none"] | None = Field(
        default=None,
        validation_alias=AliasChoices("REDIS_SSL_CERT_REQS", "redis_ssl_cert_reqs"),
        description="REDIS_SSL_CERT_REQS: required (default: the server's certificate is "
        "verified), optional or none (not verified: for tests only).",
    )
