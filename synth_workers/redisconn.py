"""The one place Redis clients are built from settings: one server or Redis Sentinel, with TLS.

Where Redis is (:class:`RedisTarget`, from :func:`redis_target`) is decided here once, and
every Redis client the platform opens is built by :func:`redis_client` /
:func:`async_redis_client` from it, so each follows a Sentinel failover the same way:

- one server: ``REDIS_URL=redis://[:password@]host:6379/0`` (``rediss://``, or ``?ssl=true``,
  for TLS; ``REDIS_SSL_CA_CERTS``, ``REDIS_SSL_CERTFILE``, ``REDIS_SSL_KEYFILE`` and
  ``REDIS_SSL_CERT_REQS`` or the same names in the URL's query for its certificates);
- Redis Sentinel, the guide's form: ``REDIS_URL=redis://[:password@]sentinel1:26379,
  sentinel2:26379/0`` (the hosts are sentinels) with ``REDIS_SENTINEL_NAME``; or kombu's
  form ``sentinel://:password@h1:26379;sentinel://:password@h2:26379`` with
  ``REDIS_SENTINEL_NAME``. The URL's password is the master's; ``REDIS_SENTINEL_PASSWORD``
  is the sentinels' own (their ``requirepass``), when they have one.

A Sentinel client asks the sentinels for the master's address whenever it (re)connects, so
after a failover its next command reaches the new master: no restart.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as async_sentinel
from redis.sentinel import Sentinel

from synth_workers.errors import ConfigurationError

if TYPE_CHECKING:
    from synth_workers.settings import Settings

#: The TLS options a Redis URL's query or the ``REDIS_SSL_*`` variables may carry.
TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}
#: The platform's own transport on Redis (no ack emulation), one server or Sentinel.
TRANSPORT = "synth_workers.broker:Transport"
SENTINEL_TRANSPORT = "synth_workers.broker:SentinelTransport"


@dataclass(frozen=True)
class RedisTarget:
    """Where the platform's Redis is: one server (``url``), or the master that the
    ``sentinels`` watch under ``master_name``."""

    #: One server: its URL, TLS options in the query. Sentinel: kombu's form of the
    #: sentinels (``sentinel://:password@h1:26379/0;sentinel://...``), for Celery.
    url: str = field(repr=False)
    master_name: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    #: The master's credentials and database (Sentinel only: a server's are in ``url``).
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    #: The sentinels' own password (their ``requirepass``), if any.
    sentinel_password: str | None = field(default=None, repr=False)
    #: TLS to the master and the sentinels (Sentinel only): the ``ssl_*`` options.
    tls: dict[str, str] = field(default_factory=dict)

    @property
    def is_sentinel(self) -> bool:
        return self.master_name is not None

    def sentinel_kwargs(self, timeout: float | None = None) -> dict[str, Any]:
        """What a connection to a sentinel takes: its password, TLS and timeouts (redis-py
        gives sentinels no timeout of their own once ``sentinel_kwargs`` is set)."""
        kwargs: dict[str, Any] = {}
        if self.sentinel_password is not None:
            kwargs["password"] = self.sentinel_password
        if timeout is not None:
            kwargs["socket_timeout"] = timeout
            kwargs["socket_connect_timeout"] = timeout
        if self.tls:
            kwargs.update(ssl=True, **self.tls)
        return kwargs


def _hosts(netloc: str, scheme: str) -> list[tuple[str, int]]:
    """``h1:26379,h2:26379`` (after any ``user:password@``) as (host, port) pairs."""
    hosts = []
    for item in netloc.rpartition("@")[2].split(","):
        parts = urlsplit(f"//{item.strip()}")
        try:
            port = parts.port or 26379
        except ValueError:
            port = 0
        if not parts.hostname or not port:
            raise ConfigurationError(f"REDIS_URL: {scheme}:// lists a bad sentinel {item!r}")
        hosts.append((parts.hostname, port))
    return hosts


def _credentials(netloc: str) -> tuple[str | None, str | None]:
    userinfo, at, _ = netloc.rpartition("@")
    if not at:
        return None, None
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None)


def _db(path: str) -> int:
    text = path.strip("/") or "0"
    if not text.isdigit():
        raise ConfigurationError(f"REDIS_URL: the database must be a number, got {text!r}")
    return int(text)


def _tls_query(query: list[tuple[str, str]], tls: dict[str, str]) -> list[tuple[str, str]]:
    """``query`` with the TLS options of ``tls`` (the ``REDIS_SSL_*`` variables win over the
    URL's own: ``rediss://`` URLs always carry ``ssl_cert_reqs``, see ``redis_tls_url``)."""
    return [(k, v) for k, v in query if k not in tls] + list(tls.items())


def redis_target(
    url: str,
    sentinel_name: str | None = None,
    sentinel_password: str | None = None,
    tls: dict[str, str] | None = None,
) -> RedisTarget:
    """Where ``url`` (a ``REDIS_URL``, ``?ssl=true`` already made ``rediss://``) points.

    Sentinel when ``sentinel_name`` is given or the URL is ``sentinel://`` or lists several
    hosts; :class:`ConfigurationError` naming the variable for a Sentinel URL without a
    master name, or TLS options on a URL that is not TLS."""
    tls = {k: v for k, v in (tls or {}).items() if v}
    chunks = [c for c in url.split(";") if c.strip()]
    first = urlsplit(chunks[0]) if chunks else urlsplit(url)
    scheme = first.scheme
    several = len(chunks) > 1 or "," in first.netloc
    if scheme not in ("sentinel", "redis", "rediss") or not (
        sentinel_name or scheme == "sentinel" or several
    ):
        if tls and scheme != "rediss":
            raise ConfigurationError(
                "REDIS_SSL_* options are set but REDIS_URL is not TLS: use rediss:// or "
                "add ?ssl=true"
            )
        if not tls:
            return RedisTarget(url=url)
        with_tls = _tls_query(parse_qsl(first.query, keep_blank_values=True), tls)
        return RedisTarget(url=urlunsplit(first._replace(query=urlencode(with_tls))))
    if not sentinel_name:
        raise ConfigurationError(
            f"REDIS_URL lists Redis Sentinels ({scheme}://...) but REDIS_SENTINEL_NAME, the "
            "name of the master they watch (`sentinel monitor NAME ...`), is not set"
        )
    sentinels: list[tuple[str, int]] = []
    query: list[tuple[str, str]] = []
    for chunk in chunks:
        parts = urlsplit(chunk.strip())
        if parts.scheme != scheme:
            raise ConfigurationError(f"REDIS_URL: every sentinel URL must be {scheme}://")
        sentinels += _hosts(parts.netloc, scheme)
        query += parse_qsl(parts.query, keep_blank_values=True)
    username, password = _credentials(first.netloc)
    query_tls = {k: v for k, v in query if k in TLS_OPTIONS}
    if scheme == "rediss" or query_tls:
        tls = {"ssl_cert_reqs": "required", **query_tls, **tls}
    elif tls:
        raise ConfigurationError(
            "REDIS_SSL_* options are set but REDIS_URL is not TLS: use rediss:// or ?ssl=true"
        )
    auth = ""
    if username or password:
        auth = f"{quote(username or '', safe='')}:{quote(password or '', safe='')}@"
    db = _db(first.path)
    kombu_url = ";".join(f"sentinel://{auth}{host}:{port}/{db}" for host, port in sentinels)
    return RedisTarget(
        url=kombu_url,
        master_name=sentinel_name,
        sentinels=tuple(sentinels),
        username=username,
        password=password,
        db=db,
        sentinel_password=sentinel_password,
        tls=tls,
    )


def target_of(settings: Settings) -> RedisTarget:
    """The broker's :class:`RedisTarget` from ``settings`` (``REDIS_URL`` and the
    ``REDIS_SENTINEL_*`` / ``REDIS_SSL_*`` variables)."""
    password = settings.redis_sentinel_password
    return redis_target(
        settings.broker_url,
        settings.redis_sentinel_name,
        password.get_secret_value() if password is not None else None,
        {
            "ssl_ca_certs": settings.redis_ssl_ca_certs or "",
            "ssl_certfile": settings.redis_ssl_certfile or "",
            "ssl_keyfile": settings.redis_ssl_keyfile or "",
            "ssl_cert_reqs": settings.redis_ssl_cert_reqs or "",
        },
    )


def _as_target(where: RedisTarget | Settings | str) -> RedisTarget:
    if isinstance(where, RedisTarget):
        return where
    if isinstance(where, str):
        return redis_target(where)
    return target_of(where)


def _master_kwargs(target: RedisTarget, options: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"db": target.db, **options}
    if target.username is not None:
        kwargs["username"] = target.username
    if target.password is not None:
        kwargs["password"] = target.password
    if target.tls:
        kwargs.update(ssl=True, **target.tls)
    return kwargs


def redis_client(where: RedisTarget | Settings | str, **options: Any) -> redis.Redis:
    """A redis-py client for ``where`` (``options``: redis-py's, e.g. ``socket_timeout``).

    Sentinel: the client of the current master, found again through the sentinels on each
    new connection (after a failover, the next command goes to the new master)."""
    target = _as_target(where)
    if not target.is_sentinel:
        return redis.Redis.from_url(target.url, **options)
    timeout = options.get("socket_connect_timeout") or options.get("socket_timeout")
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=target.sentinel_kwargs(timeout))
    assert target.master_name is not None
    master: redis.Redis = sentinel.master_for(target.master_name, **_master_kwargs(target, options))
    return master


class BlockingSentinelPool(
    async_sentinel.SentinelConnectionPool,
    aioredis.BlockingConnectionPool,
):
    """redis-py's Sentinel pool (the master found through the sentinels) that makes callers
    wait for a free connection, as ``BlockingConnectionPool`` does, instead of failing."""


def async_redis_client(
    where: RedisTarget | Settings | str,
    *,
    max_connections: int | None = None,
    pool_timeout: float | None = None,
    single_connection_client: bool = False,
    **options: Any,
) -> aioredis.Redis:
    """:func:`redis_client` for asyncio. ``max_connections`` with ``pool_timeout``: a bounded
    pool whose callers wait their turn up to ``pool_timeout`` seconds.
    ``single_connection_client``: every command on one connection."""
    target = _as_target(where)
    if not target.is_sentinel:
        if max_connections is None:
            return aioredis.Redis.from_url(
                target.url, single_connection_client=single_connection_client, **options
            )
        pool = aioredis.BlockingConnectionPool.from_url(
            target.url, max_connections=max_connections, timeout=pool_timeout, **options
        )
        return aioredis.Redis(connection_pool=pool)
    timeout = options.get("socket_connect_timeout") or options.get("socket_timeout")
    sentinel = async_sentinel.Sentinel(
        list(target.sentinels), sentinel_kwargs=target.sentinel_kwargs(timeout)
    )
    assert target.master_name is not None
    if max_connections is not None:
        options = {**options, "max_connections": max_connections, "timeout": pool_timeout}
        options["connection_pool_class"] = BlockingSentinelPool
    client: aioredis.Redis = sentinel.master_for(
        target.master_name, **_master_kwargs(target, options)
    )
    if not single_connection_client:
        return client
    return aioredis.Redis(connection_pool=client.connection_pool, single_connection_client=True)


def celery_redis_config(
    target: RedisTarget, result_backend_url: str | None, timeout: float | None = None
) -> dict[str, Any]:
    """The Celery settings that point the broker and the result backend at ``target``:
    the platform's transport (no ack emulation) on one server or on Sentinel, and for
    Sentinel the ``master_name``/``sentinel_kwargs`` options kombu and Celery read.
    ``broker_transport_options`` here are merged into the app's by the caller."""
    if not target.is_sentinel:
        scheme = target.url.split("://", 1)[0]
        config: dict[str, Any] = {
            "broker_url": target.url,
            "result_backend": result_backend_url or target.url,
            "broker_transport_options": {},
        }
        if scheme in ("redis", "rediss"):
            config["broker_transport"] = TRANSPORT
        return config
    sentinel_options: dict[str, Any] = {"master_name": target.master_name}
    sentinel_kwargs = target.sentinel_kwargs(timeout)
    if sentinel_kwargs:
        sentinel_options["sentinel_kwargs"] = sentinel_kwargs
    config = {
        "broker_url": target.url,
        "broker_transport": SENTINEL_TRANSPORT,
        "broker_transport_options": dict(sentinel_options),
        "result_backend": result_backend_url or target.url,
    }
    if not result_backend_url:
        config["result_backend_transport_options"] = dict(sentinel_options)
    if target.tls:
        ssl_options: dict[str, Any] = {**target.tls}
        reqs = target.tls.get("ssl_cert_reqs", "required")
        ssl_options["ssl_cert_reqs"] = _CERT_REQS.get(reqs, ssl.CERT_REQUIRED)
        config["broker_use_ssl"] = ssl_options
        if not result_backend_url:
            config["redis_backend_use_ssl"] = ssl_options
    return config


def sentinel_settings(transport_options: dict[str, Any] | None) -> dict[str, Any]:
    """An adopted Celery app's Sentinel options (kombu's ``master_name`` and
    ``sentinel_kwargs``' password) as settings overrides."""
    options = transport_options or {}
    found: dict[str, Any] = {}
    if options.get("master_name"):
        found["redis_sentinel_name"] = str(options["master_name"])
    password = (options.get("sentinel_kwargs") or {}).get("password")
    if password:
        found["redis_sentinel_password"] = str(password)
    return found
