"""The small HTTP server of the worker's probes and metrics, and of ``metrics serve``."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

#: (status code, content type, body)
Response = tuple[int, str, bytes]
JSON = "application/json"


def json_response(code: int, body: Any) -> Response:
    return code, JSON, json.dumps(body, default=str).encode()


def metrics_response(registry: Callable[[], CollectorRegistry]) -> Callable[[], Response]:
    def serve() -> Response:
        return 200, CONTENT_TYPE_LATEST, generate_latest(registry())

    return serve


class OpsServer:
    """A small threaded HTTP server for ``/metrics`` and the probes (GET only)."""

    def __init__(self, address: str, port: int, routes: dict[str, Callable[[], Response]]):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = outer.routes.get(self.path.split("?", 1)[0].rstrip("/") or "/")
                if route is None:
                    code, ctype, body = json_response(404, {"error": "not found"})
                else:
                    try:
                        code, ctype, body = route()
                    except Exception as exc:
                        log.exception("%s failed", self.path)
                        code, ctype, body = json_response(500, {"error": repr(exc)})
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("ops http: " + format, *args)

        self.routes = routes
        self.httpd = ThreadingHTTPServer((address, port), Handler)
        self.httpd.daemon_threads = True
        host, port = self.httpd.server_address[:2]
        self.address = host if isinstance(host, str) else host.decode()
        self.port = int(port)
        self._thread: threading.Thread | None = None
        # Pool children forked from this process must not keep the listening socket open.
        listener = self.httpd.socket
        os.register_at_fork(after_in_child=listener.close)

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, name="synth-ops-http", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
