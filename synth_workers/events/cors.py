"""CORS for the SSE server: which web pages may read it (``CORS_ORIGINS``).

A browser page on another origin (a dashboard) may read an answer only if it carries
``Access-Control-Allow-Origin``. Only an origin listed in ``CORS_ORIGINS`` gets it, echoed
back with ``Access-Control-Allow-Credentials: true`` (an ``EventSource`` with
``withCredentials``); ``*`` (configured alone) answers every origin with a literal ``*`` and
never allows credentials. Answers that depend on the ``Origin`` header say so with
``Vary: Origin`` (a shared cache must not hand one origin's answer to another).

A preflight (``OPTIONS`` with ``Access-Control-Request-Method``, which a browser sends
before a request with an ``Authorization`` header) is answered ``204`` with the allowed
method and headers, or ``403`` when the origin, the method or a header is not allowed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import tornado.web

#: Methods a page may use.
METHODS = ("GET", "OPTIONS")
#: Request headers a page may send (lower case): the token's header form and the resume
#: cursor (an ``EventSource`` sends it when it reconnects).
HEADERS = ("authorization", "last-event-id", "cache-control", "accept")
#: Seconds a browser may keep a preflight's answer.
MAX_AGE = 600


class CorsPolicy:
    """The ``CORS_ORIGINS`` rule: headers for an answer to a page of a given origin."""

    def __init__(self, origins: Iterable[str]) -> None:
        listed = [o for o in origins if o]
        self.any = listed == ["*"]
        self.origins = frozenset(() if self.any else listed)

    def allowed(self, origin: str | None) -> bool:
        return bool(origin) and (self.any or origin in self.origins)

    def headers(self, origin: str | None) -> dict[str, str]:
        """Headers for an ordinary answer to a request with ``Origin: origin``."""
        if self.any:
            return {"Access-Control-Allow-Origin": "*"}
        out: dict[str, str] = {}
        if self.origins:
            out["Vary"] = "Origin"
        if origin and self.allowed(origin):
            out["Access-Control-Allow-Origin"] = origin
            out["Access-Control-Allow-Credentials"] = "true"
        return out

    def preflight(
        self, origin: str | None, method: str | None, headers: str | None
    ) -> tuple[int, dict[str, str], str | None]:
        """(status, headers, refusal reason) for an ``OPTIONS`` preflight."""
        # whether the answer allows anything depends on the origin, even under ``*``
        vary = {"Vary": "Origin"}
        if not self.allowed(origin):
            return 403, vary, f"origin {origin!r} is not in CORS_ORIGINS"
        if method is None or method.upper() not in METHODS:
            return 403, vary, f"method {method!r} is not allowed (only GET)"
        asked = [h.strip().lower() for h in (headers or "").split(",") if h.strip()]
        refused = [h for h in asked if h not in HEADERS]
        if refused:
            return 403, vary, f"header(s) {', '.join(refused)} not allowed"
        out = {**vary, **self.headers(origin)}
        out["Access-Control-Allow-Methods"] = ", ".join(METHODS)
        if asked:
            out["Access-Control-Allow-Headers"] = ", ".join(asked)
        out["Access-Control-Max-Age"] = str(MAX_AGE)
        return 204, out, None


class CorsHandler(tornado.web.RequestHandler):
    """CORS headers on every answer (errors too, so a page can read why), and the
    preflight; a subclass sets :attr:`cors` in ``initialize``."""

    cors: CorsPolicy | None = None

    def set_default_headers(self) -> None:
        if self.cors is not None:
            for name, value in self.cors.headers(self.request.headers.get("Origin")).items():
                self.set_header(name, value)

    def options(self) -> None:
        headers = self.request.headers
        policy = self.cors or CorsPolicy(())
        status, allowed, refusal = policy.preflight(
            headers.get("Origin"),
            headers.get("Access-Control-Request-Method"),
            headers.get("Access-Control-Request-Headers"),
        )
        self.clear_header("Access-Control-Allow-Origin")
        self.clear_header("Access-Control-Allow-Credentials")
        for name, value in allowed.items():
            self.set_header(name, value)
        self.set_status(status)
        if refusal is None:
            self.finish()
        else:
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"error": refusal}))
