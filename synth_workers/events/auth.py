"""Bearer tokens of the SSE server: JWTs signed with ``JWT_SECRET`` (HS256); ``sub`` is the
user. Only HS256 is accepted (no ``none``, no key confusion); ``exp``/``nbf`` are checked
when present."""

from __future__ import annotations

import jwt

from synth_workers.errors import SynthWorkersError

ALGORITHM = "HS256"


class AuthenticationError(SynthWorkersError):
    """No bearer token, or one that is not valid (signature, expiry, missing ``sub``)."""


def issue_token(secret: str, user_id: str, ttl: float | None = 3600.0) -> str:
    """A token for ``user_id`` (tests, the CLI, an application's login)."""
    import time

    claims: dict[str, object] = {"sub": user_id, "iat": int(time.time())}
    if ttl is not None:
        claims["exp"] = int(time.time() + ttl)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header."""
    if not authorization:
        raise AuthenticationError("no Authorization header")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("Authorization is not a bearer token")
    return token.strip()


def authenticate(authorization: str | None, secret: str) -> str:
    """The user id (``sub``) of a valid bearer token; :class:`AuthenticationError` otherwise."""
    token = bearer_token(authorization)
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["sub"]},
            leeway=5,
        )
    except jwt.PyJWTError as exc:
        raise AuthenticationError(f"invalid token: {exc}") from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise AuthenticationError("invalid token: sub must be a non-empty string")
    return subject
