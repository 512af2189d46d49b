"""Bearer tokens of the SSE server: JWTs signed with ``JWT_SECRET`` (HS256); ``sub`` is the
user. Only HS256 is accepted (no ``none``, no key confusion). Every token must carry ``exp``,
no further ahead than ``SYNTH_EVENTS_TOKEN_MAX_TTL`` (a stolen token is not good forever);
``nbf`` is checked when present.

A request carries its token in an ``Authorization: Bearer`` header or, for a browser's
``EventSource`` (which cannot send headers), in the ``access_token`` query parameter
(RFC 6750 §2.3); never both (:class:`TokenRequestError`)."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlencode

import jwt

from synth_workers.errors import ConfigurationError, SynthWorkersError

if TYPE_CHECKING:
    from tornado.httputil import HTTPServerRequest

    from synth_workers.settings import Settings

ALGORITHM = "HS256"
#: Seconds of clock skew allowed between the issuer and the server.
LEEWAY = 5
#: The least length of JWT_SECRET, in bytes (UTF-8): HS256's key is 256 bits.
MIN_SECRET_BYTES = 32
#: The query parameter a token may come in (RFC 6750 §2.3).
QUERY_PARAMETER = "access_token"


class AuthenticationError(SynthWorkersError):
    """No bearer token, or one that is not valid (signature, expiry, missing ``sub``)."""


class TokenRequestError(AuthenticationError):
    """The token came both as a header and as ``access_token`` (a 400, RFC 6750 §3.1)."""


def secret_of(settings: Settings) -> str:
    """JWT_SECRET; :class:`ConfigurationError` when it is not set or shorter than
    :data:`MIN_SECRET_BYTES` (a short HS256 key can be guessed offline from one token)."""
    secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else ""
    if not secret:
        raise ConfigurationError(
            "JWT_SECRET is not set: `synth-workers events serve` verifies bearer tokens "
            "(HS256) with it. Set JWT_SECRET to the secret your application signs them with."
        )
    if len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"JWT_SECRET is {len(secret.encode())} bytes; `synth-workers events serve` needs "
            f"at least {MIN_SECRET_BYTES} (UTF-8): HS256 keys that short can be guessed. "
            "Generate one, e.g. `openssl rand -base64 32`."
        )
    return secret


def issue_token(secret: str, user_id: str, ttl: float = 3600.0) -> str:
    """A token for ``user_id`` that expires in ``ttl`` seconds (tests, the CLI, an
    application's login). ``ttl`` must be positive and finite: the server refuses a token
    without ``exp``."""
    if not 0 < ttl < math.inf:
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
    now = time.time()
    claims: dict[str, object] = {"sub": user_id, "iat": int(now), "exp": int(now + ttl)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def bearer_token(authorization: str | None, access_token: str | None = None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header, or the ``access_token``
    query parameter's (``None``: not given)."""
    if access_token is not None:
        if authorization:
            raise TokenRequestError(
                "a token both in the Authorization header and in access_token: send one"
            )
        if not access_token.strip():
            raise AuthenticationError("access_token is empty")
        return access_token.strip()
    if not authorization:
        raise AuthenticationError("no Authorization header or access_token query parameter")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("Authorization is not a bearer token")
    return token.strip()


def authenticate(
    authorization: str | None, secret: str, max_ttl: float, access_token: str | None = None
) -> str:
    """The user id (``sub``) of a valid bearer token (the header's, or ``access_token``)
    whose ``exp`` lies at most ``max_ttl`` seconds ahead (plus the leeway);
    :class:`AuthenticationError` otherwise."""
    token = bearer_token(authorization, access_token)
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["sub", "exp"]},
            leeway=LEEWAY,
        )
    except jwt.PyJWTError as exc:
        raise AuthenticationError(f"invalid token: {exc}") from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise AuthenticationError("invalid token: sub must be a non-empty string")
    # PyJWT has taken int() of exp (a number or a numeric string) and found it not past.
    if int(claims["exp"]) - time.time() > max_ttl + LEEWAY:
        raise AuthenticationError(
            f"invalid token: exp is more than {max_ttl:g} s ahead "
            "(the server's SYNTH_EVENTS_TOKEN_MAX_TTL); issue shorter-lived tokens"
        )
    return subject


def take_query_token(request: HTTPServerRequest) -> list[str]:
    """The ``access_token`` values of ``request``, removed from it: its URI (what access
    lines and error reports print) keeps ``access_token=[REDACTED]`` in their place."""
    values = request.query_arguments.pop(QUERY_PARAMETER, None)
    request.arguments.pop(QUERY_PARAMETER, None)
    if values is None:
        return []
    pairs = [
        (k, "[REDACTED]" if k == QUERY_PARAMETER else v)
        for k, v in parse_qsl(request.query, keep_blank_values=True)
    ]
    request.query = urlencode(pairs, safe="[]")
    request.uri = f"{request.path}?{request.query}"
    return [v.decode("utf-8", "replace") for v in values]
