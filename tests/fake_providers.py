"""A loopback server speaking the providers' HTTP protocols, for the real SDKs to call.

- SendGrid ``POST /v3/mail/send`` → 202 (``X-Message-Id``)
- OpenAI ``POST /v1/chat/completions`` → a ``chat.completion`` with ``usage``
- Anthropic ``POST /v1/messages`` → a ``message`` with ``usage``
- OpenAI ``POST /v1/embeddings`` → one :func:`fake_vector` per input (floats or base64)

Each path answers from a script (``script(path, Reply(...), ...)``, used up in order) and
then with its default success. Errors carry each provider's own error body. Every request is
logged (arrival time, path, headers, JSON body) for the tests to check what the SDK sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SENDGRID = "/v3/mail/send"
OPENAI = "/v1/chat/completions"
ANTHROPIC = "/v1/messages"
EMBEDDINGS = "/v1/embeddings"
#: Size of the fake embedding vectors.
DIM = 8


def fake_vector(text: str) -> list[float]:
    """The fake embedding of ``text`` (deterministic)."""
    digest = hashlib.sha256(text.encode()).digest()
    return [b / 255.0 for b in digest[:DIM]]


def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = []
    for i, text in enumerate(inputs):
        vector = fake_vector(text)
        if body.get("encoding_format") == "base64":
            emb: Any = base64.b64encode(struct.pack(f"<{DIM}f", *vector)).decode()
        else:
            emb = vector
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return {
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)},
    }


@dataclass
class Reply:
    """One scripted answer: ``status``, an error ``message`` (wrapped in the provider's error
    body) or a raw ``body``, extra ``headers``, and a ``delay`` before answering."""

    status: int = 200
    message: str | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True)
class Logged:
    at: float
    path: str
    headers: dict[str, str]
    body: Any


def _error_body(path: str, status: int, message: str) -> Any:
    if path == SENDGRID:
        return {"errors": [{"message": message, "field": None, "help": None}]}
    if path == ANTHROPIC:
        kind = {429: "rate_limit_error", 400: "invalid_request_error", 529: "overloaded_error"}
        error = {"type": kind.get(status, "api_error"), "message": message}
        return {"type": "error", "error": error}
    return {"error": {"message": message, "type": "error", "param": None, "code": str(status)}}


def _prompt_text(body: Any) -> str:
    parts = []
    for m in body.get("messages", []):
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(c.get("text", "") for c in content if isinstance(c, dict))
    system = body.get("system")
    if isinstance(system, str):
        parts.insert(0, system)
    return "\n".join(parts)


def answer_for(prompt: str) -> str:
    """The fake model's deterministic answer: the first document line, tagged."""
    lines = [ln for ln in prompt.splitlines() if ln.strip()]
    return f"SUMMARY<{lines[-1][:60] if lines else ''}>"


def tokens_of(text: str) -> int:
    return len(text) // 4 + 1


class FakeProviders:
    """A ThreadingHTTPServer on 127.0.0.1 (a free port) in a daemon thread."""

    def __init__(self) -> None:
        self.log: list[Logged] = []
        self.rate_headers: dict[str, dict[str, str]] = {}
        #: Seconds every default (success) answer of a path waits.
        self.delays: dict[str, float] = {}
        self._scripts: dict[str, deque[Reply]] = defaultdict(deque)
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                owner._serve(self)

            def do_GET(self) -> None:
                owner._serve(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def script(self, path: str, *replies: Reply) -> None:
        with self._lock:
            self._scripts[path].extend(replies)

    def requests(self, path: str | None = None) -> list[Logged]:
        with self._lock:
            return [r for r in self.log if path is None or r.path == path]

    def max_in_window(self, path: str, window: float) -> int:
        """The most requests to ``path`` that arrived within any ``window`` seconds."""
        times = sorted(r.at for r in self.requests(path))
        best = 0
        start = 0
        for end, t in enumerate(times):
            while t - times[start] >= window:
                start += 1
            best = max(best, end - start + 1)
        return best

    # --- serving -------------------------------------------------------------------------
    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        arrived = time.time()
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        path = handler.path.split("?", 1)[0]
        with self._lock:
            self.log.append(
                Logged(arrived, path, {k.lower(): v for k, v in handler.headers.items()}, body)
            )
            reply = self._scripts[path].popleft() if self._scripts[path] else None
            default_delay = self.delays.get(path, 0.0)
        if reply is None:
            reply = Reply(status=202 if path == SENDGRID else 200, delay=default_delay)
        if reply.delay:
            time.sleep(reply.delay)
        status, payload, headers = self._response(path, body, reply)
        data = b"" if payload is None else json.dumps(payload).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                handler.send_header(k, v)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _response(self, path: str, body: Any, reply: Reply) -> tuple[int, Any, dict[str, str]]:
        headers = dict(reply.headers)
        if reply.status >= 300:
            payload = reply.body
            if payload is None:
                payload = _error_body(path, reply.status, reply.message or "error")
            return reply.status, payload, headers
        if reply.body is not None:
            return reply.status, reply.body, headers
        if path == SENDGRID:
            headers.setdefault("X-Message-Id", uuid.uuid4().hex)
            return 202, None, headers
        body = body if isinstance(body, dict) else {}
        if path == EMBEDDINGS:
            return 200, _embeddings(body), headers
        prompt = _prompt_text(body)
        text = answer_for(prompt)
        headers.update(self.rate_headers.get(path, {}))
        if path == ANTHROPIC:
            return (
                200,
                {
                    "id": f"msg_{uuid.uuid4().hex[:12]}",
                    "type": "message",
                    "role": "assistant",
                    "model": body.get("model", "?"),
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": "end_turn",
                    "stop_sequence": None,
                    "usage": {"input_tokens": tokens_of(prompt), "output_tokens": tokens_of(text)},
                },
                headers,
            )
        return (
            200,
            {
                "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "?"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": tokens_of(prompt),
                    "completion_tokens": tokens_of(text),
                    "total_tokens": tokens_of(prompt) + tokens_of(text),
                },
            },
            headers,
        )
