"""The providers' batch endpoints on the loopback server (:class:`FakeBatchProviders`), for the
real ``openai`` and ``anthropic`` SDKs:

- OpenAI: ``POST /v1/files`` (multipart, purpose ``batch``), ``GET /v1/files/{id}/content``,
  ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches`` (newest first, cursor
  ``after``);
- Anthropic: ``POST /v1/messages/batches``, ``GET /v1/messages/batches/{id}``,
  ``GET /v1/messages/batches`` (newest first, ``after_id``),
  ``GET /v1/messages/batches/{id}/results`` (JSONL).

Each request of a batch is answered as the online endpoint would answer it
(:class:`FakeProviders`); a request whose text holds ``BATCH-ERROR-<status>`` fails alone with
that status (``BATCH-ERROR-<status>-ONCE``: the first time only). A batch ends at the first
status request (or listing) ``batch_seconds`` after its creation, the way ``modes`` (used up
in order, then ``complete``) says: ``complete``, or ``expire_half`` (the first half of its
requests answered, the rest expired). ``hold_create`` (an Event) holds
the answer to a batch creation, already recorded, until it is set; ``created`` is set when a
creation arrives: a test kills the submitter in between.
"""

from __future__ import annotations

import email.parser
import json
import re
import threading
import time
import uuid
from collections import deque
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .fake_providers import ANTHROPIC, EMBEDDINGS, OPENAI, FakeProviders, Logged, Reply

FILES = "/v1/files"
BATCHES = "/v1/batches"
MESSAGE_BATCHES = "/v1/messages/batches"
_ERROR = re.compile(r"BATCH-ERROR-(\d{3})(-ONCE)?")
_ONLINE = {"/v1/chat/completions": OPENAI, "/v1/embeddings": EMBEDDINGS}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


class FakeBatchProviders(FakeProviders):
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.batch_seconds = 0.0
        self.modes: deque[str] = deque()
        self.hold_create: threading.Event | None = None
        #: Batch creations still to answer with a 500 (nothing created).
        self.fail_creates = 0
        self.created = threading.Event()
        self._failed_once: set[str] = set()
        super().__init__()

    # --- what the tests read ------------------------------------------------------------
    def provider_batches(self, provider: str) -> list[dict[str, Any]]:
        with self._lock:
            return [b for b in self.batches.values() if b["provider"] == provider]

    def batch_calls(self) -> list[Logged]:
        """Every request to a batch or file endpoint (``body``: the HTTP method)."""
        return [r for r in self.requests() if r.path.startswith((FILES, BATCHES, MESSAGE_BATCHES))]

    # --- serving ------------------------------------------------------------------------
    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        if not path.startswith((FILES, BATCHES, MESSAGE_BATCHES)):
            super()._serve(handler)
            return
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        query = {k: v[0] for k, v in parse_qs(urlsplit(handler.path).query).items()}
        with self._lock:
            headers = {k.lower(): v for k, v in handler.headers.items()}
            self.log.append(Logged(time.time(), path, headers, handler.command))
        status, body, content_type = self._route(handler.command, path, raw, query, handler)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(
        self, method: str, path: str, raw: bytes, query: dict[str, str], handler: Any
    ) -> tuple[int, Any, str]:
        parts = path.strip("/").split("/")
        js = "application/json"
        if method == "POST" and path == FILES:
            return 200, self._upload(raw, handler.headers.get("Content-Type", "")), js
        if method == "GET" and path.startswith(FILES) and path.endswith("/content"):
            return 200, self.files.get(parts[2], b""), "application/octet-stream"
        if method == "POST" and path in (BATCHES, MESSAGE_BATCHES) and self.fail_creates:
            self.fail_creates -= 1
            return 500, {"error": {"message": "overloaded", "type": "api_error"}}, js
        if method == "POST" and path in (BATCHES, MESSAGE_BATCHES):
            made = self._create("openai" if path == BATCHES else "anthropic", json.loads(raw))
            return 200, made, js
        if method == "GET" and path in (BATCHES, MESSAGE_BATCHES):
            provider = "openai" if path == BATCHES else "anthropic"
            return 200, self._list(provider, query), js
        if method == "GET" and path.startswith(MESSAGE_BATCHES) and path.endswith("/results"):
            batch = self._advance(parts[3])
            lines = [json.dumps(r) for r in batch["results"]]
            return 200, ("\n".join(lines) + "\n").encode(), "application/binary"
        if method == "GET":
            batch_id = parts[-1]
            if batch_id not in self.batches:
                return 404, {"error": {"message": "no such batch", "type": "not_found"}}, js
            return 200, self._view(self._advance(batch_id)), js
        return 404, {"error": {"message": f"no route {method} {path}"}}, js

    def _upload(self, raw: bytes, content_type: str) -> dict[str, Any]:
        message = email.parser.BytesParser().parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw
        )
        content = b""
        for part in message.walk():
            if part.get_filename():
                content = part.get_payload(decode=True) or b""
        file_id = f"file-{uuid.uuid4().hex[:16]}"
        with self._lock:
            self.files[file_id] = content
        return {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": "batch.jsonl",
            "purpose": "batch",
            "status": "processed",
        }

    def _create(self, provider: str, body: dict[str, Any]) -> dict[str, Any]:
        now = time.time()
        if provider == "openai":
            lines = self.files[body["input_file_id"]].decode().splitlines()
            requests = [json.loads(ln) for ln in lines if ln.strip()]
            items = [(r["custom_id"], r["url"], r["body"]) for r in requests]
            batch_id = f"batch_{uuid.uuid4().hex[:16]}"
        else:
            items = [(r["custom_id"], ANTHROPIC, r["params"]) for r in body["requests"]]
            batch_id = f"msgbatch_{uuid.uuid4().hex[:16]}"
        with self._lock:
            mode = self.modes.popleft() if self.modes else "complete"
            self.batches[batch_id] = {
                "id": batch_id,
                "provider": provider,
                "created": now,
                "mode": mode,
                "items": items,
                "metadata": body.get("metadata"),
                "endpoint": body.get("endpoint"),
                "input_file_id": body.get("input_file_id"),
                "ended": False,
                "results": [],
                "status": "in_progress",
            }
        self.created.set()
        gate = self.hold_create
        if gate is not None:
            gate.wait(60)
        return self._view(self.batches[batch_id])

    def _advance(self, batch_id: str) -> dict[str, Any]:
        with self._lock:
            batch = self.batches[batch_id]
            if not batch["ended"] and time.time() - batch["created"] >= self.batch_seconds:
                self._finish(batch)
            return batch

    def _finish(self, batch: dict[str, Any]) -> None:
        items = batch["items"]
        answered = len(items) // 2 if batch["mode"] == "expire_half" else len(items)
        out, errors = [], []
        for index, (custom_id, url, body) in enumerate(items):
            if index >= answered:
                if batch["provider"] == "openai":
                    error = {"code": "batch_expired", "message": "not run before expiry"}
                    errors.append(
                        {"id": custom_id, "custom_id": custom_id, "response": None, "error": error}
                    )
                else:
                    out.append({"custom_id": custom_id, "result": {"type": "expired"}})
                continue
            failing = _ERROR.search(json.dumps(body))
            if failing and failing.group(2):  # -ONCE: fails the first time only
                text = json.dumps(body.get("messages") or body.get("input"))
                if text in self._failed_once:
                    failing = None
                self._failed_once.add(text)
            reply = (
                Reply(status=int(failing.group(1)), message="refused in batch")
                if failing
                else Reply()
            )
            status, payload, _ = self._response(_ONLINE.get(url, url), body, reply)
            if batch["provider"] == "openai":
                record = {
                    "id": f"req_{index}",
                    "custom_id": custom_id,
                    "response": {"status_code": status, "request_id": f"r{index}", "body": payload},
                    "error": None,
                }
                (out if status == 200 else errors).append(record)
            elif status == 200:
                out.append(
                    {"custom_id": custom_id, "result": {"type": "succeeded", "message": payload}}
                )
            else:
                out.append(
                    {"custom_id": custom_id, "result": {"type": "errored", "error": payload}}
                )
        batch["results"] = out + errors
        batch["ended"] = True
        batch["ended_at"] = time.time()
        if batch["provider"] == "openai":
            batch["status"] = "expired" if batch["mode"] == "expire_half" else "completed"
            for key, lines in (("output_file_id", out), ("error_file_id", errors)):
                if lines:
                    file_id = f"file-{uuid.uuid4().hex[:16]}"
                    self.files[file_id] = ("\n".join(json.dumps(x) for x in lines) + "\n").encode()
                    batch[key] = file_id
        else:
            batch["status"] = "ended"

    def _view(self, batch: dict[str, Any]) -> dict[str, Any]:
        if batch["provider"] == "openai":
            total = len(batch["items"])
            done = sum(
                1 for r in batch["results"] if (r.get("response") or {}).get("status_code") == 200
            )
            return {
                "id": batch["id"],
                "object": "batch",
                "endpoint": batch["endpoint"],
                "input_file_id": batch["input_file_id"],
                "completion_window": "24h",
                "status": batch["status"],
                "created_at": int(batch["created"]),
                "metadata": batch["metadata"],
                "output_file_id": batch.get("output_file_id"),
                "error_file_id": batch.get("error_file_id"),
                "request_counts": {
                    "total": total,
                    "completed": done,
                    "failed": len(batch["results"]) - done,
                },
            }
        kinds = [r["result"]["type"] for r in batch["results"]]
        ended = batch["ended"]
        return {
            "id": batch["id"],
            "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": {
                "processing": 0 if ended else len(batch["items"]),
                "succeeded": kinds.count("succeeded"),
                "errored": kinds.count("errored"),
                "canceled": kinds.count("canceled"),
                "expired": kinds.count("expired"),
            },
            "created_at": _iso(batch["created"]),
            "expires_at": _iso(batch["created"] + 86400),
            "ended_at": _iso(batch["ended_at"]) if ended else None,
            "cancel_initiated_at": None,
            "archived_at": None,
            "results_url": f"{self.url}{MESSAGE_BATCHES}/{batch['id']}/results" if ended else None,
        }

    def _list(self, provider: str, query: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            for batch in self.batches.values():  # the provider works on its own
                if not batch["ended"] and time.time() - batch["created"] >= self.batch_seconds:
                    self._finish(batch)
            ordered = sorted(
                (b for b in self.batches.values() if b["provider"] == provider),
                key=lambda b: b["created"],
                reverse=True,
            )
        after = query.get("after") or query.get("after_id")
        if after:
            ids = [b["id"] for b in ordered]
            ordered = ordered[ids.index(after) + 1 :] if after in ids else []
        limit = int(query.get("limit", "20"))
        page = [self._view(b) for b in ordered[:limit]]
        more = len(ordered) > limit
        if provider == "openai":
            return {
                "object": "list",
                "data": page,
                "has_more": more,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
            }
        return {
            "data": page,
            "has_more": more,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
        }
