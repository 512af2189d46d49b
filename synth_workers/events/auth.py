"""Bearer tokens of the SSE server: JWTs signed with ``JWT_SECRET`` (HS256); ``sub`` is the
user. Only HS256 is accepted (no ``none``, no key confusion). Every token must carry ``exp``,
no further ahead than ``SYNTH_EVENTS_TOKEN_MAX_TTL`` (a stolen token is not good forever);
``nbf`` is checked when present."""

from __future__ import annotations

import math
import time

import jwt

from synth_workers.errors import SynthWorkersError

ALGORITHM = "HS256"
#: Seconds of clock skew allowed between the issuer and the server.
LEEWAY = 5


class AuthenticationError(SynthWorkersError):
    """No bearer token, or one that is not valid (signature, expiry, missing ``sub``)."""


def issue_token(secret: str, user_id: str, ttl: float = 3600.0) -> str:
    """A token for ``user_id`` that expires in ``ttl`` seconds (tests, the CLI, an
    application's login). ``ttl`` must be positive and finite: the server refuses a token
    without ``exp``."""
    if not 0 < ttl < math.inf:
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
    now = time.time()
    claims: dict[str, object] = {"sub": user_id, "iat": int(now), "exp": int(now + ttl)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not authorization:
        raise AuthenticationError("no Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("Authorization is not a bearer token")
    return token.strip()


def authenticate(authorization: str | None, secret: str, max_ttl: float) -> str:
    """The user id (``sub``) of a valid bearer token whose ``exp`` lies at most ``max_ttl``
    seconds ahead (plus the leeway); :class:`AuthenticationError` otherwise."""
    token = bearer_token(authorization)
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
