"""Hostile and malformed messages, as an attacker would push them straight onto a queue's
Redis list (used by tests/test_hostile.py and bench/hostile.py).

Each entry of :func:`hostile_messages` is the raw bytes for ``LPUSH`` and what the ledger
must say of it afterwards: the failure class and the reason (error class).
"""

from __future__ import annotations

import base64
import functools
import json
import os
import pickle
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from synth_workers.ledger.transport import priority_lists
from synth_workers.routing import DEFAULT_PRIORITY, to_transport

SIDE_EFFECT = "tests.e2e_tasks.side_effect"
RECORD = "tests.e2e_tasks.record"


def queue_list(queue: str) -> str:
    """The Redis list that jobs of normal priority wait in (where good jobs are)."""
    return priority_lists(queue)[to_transport(DEFAULT_PRIORITY)]


def envelope(
    task: str = SIDE_EFFECT,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    *,
    queue: str,
    job_id: str | None = None,
    headers: dict[str, Any] | None = None,
    body: bytes | None = None,
    properties: dict[str, Any] | None = None,
    content_type: str = "application/json",
) -> dict[str, Any]:
    """A kombu envelope of a Celery protocol-2 task message, with any part replaced."""
    job_id = job_id or str(uuid.uuid4())
    args = [] if args is None else args
    kwargs = {} if kwargs is None else kwargs
    if body is None:
        embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        body = json.dumps([args, kwargs, embed]).encode()
    return {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": content_type,
        "headers": {
            "lang": "py",
            "task": task,
            "id": job_id,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [None, None],
            "root_id": job_id,
            "parent_id": None,
            "argsrepr": repr(args),
            "kwargsrepr": repr(kwargs),
            "origin": "attacker@test",
            "ignore_result": False,
            **(headers or {}),
        },
        "properties": {
            "correlation_id": job_id,
            "reply_to": str(uuid.uuid4()),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": to_transport(DEFAULT_PRIORITY),
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
            **(properties or {}),
        },
    }


def raw(value: Any) -> bytes:
    return json.dumps(value).encode()


class Canary:
    """Unpickling this makes a folder: proof that pickle content was executed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.path),))


@functools.lru_cache(maxsize=2)
def zeros_bomb(size: int) -> bytes:
    """``size`` bytes of zeros, zlib-compressed without holding them all in memory."""
    packer = zlib.compressobj(9)
    chunk = b"\0" * (1 << 20)
    parts = [packer.compress(chunk) for _ in range(size // len(chunk))]
    parts.append(packer.flush())
    return b"".join(parts)


@dataclass(frozen=True)
class Hostile:
    name: str
    raw: bytes
    failure_class: str
    reason: str


def hostile_messages(queue: str, canaries: Path, bomb_bytes: int = 256 << 20) -> list[Hostile]:
    """One message of every class the worker must refuse, with what the ledger must say."""
    key = "hostile-ran"  # side_effect(key) counts test:count:hostile-ran if ever executed

    def env(**kw: Any) -> bytes:
        return raw(envelope(queue=queue, kwargs={"key": key}, **kw))

    body_of = envelope(queue=queue, kwargs={"key": key})
    no_props = {k: v for k, v in body_of.items() if k != "properties"}
    future = "2999-01-01T00:00:00+00:00"
    past = "2000-01-01T00:00:00+00:00"
    yaml_canary = f"!!python/object/apply:os.mkdir ['{canaries / 'yaml'}']".encode()
    bomb = zeros_bomb(bomb_bytes)
    rejected = "rejected_message"
    return [
        Hostile("not-json", b"\x80\x81 not json {", rejected, "envelope"),
        Hostile("json-list", raw([1, 2, 3]), rejected, "envelope"),
        Hostile("json-string", raw("just a string"), rejected, "envelope"),
        Hostile("no-properties", raw(no_props), rejected, "envelope"),
        Hostile("headers-not-object", raw({**body_of, "headers": "x"}), rejected, "envelope"),
        Hostile(
            "body-not-base64", raw({**body_of, "body": "!!!*not base64*"}), rejected, "envelope"
        ),
        Hostile("not-utf8", b"\xff\xfe\x00{garbage", rejected, "envelope"),
        Hostile(
            "oversize",
            env(body=b'[[], {"key": "' + b"x" * (2 << 20) + b'"}, {}]'),
            rejected,
            "size",
        ),
        Hostile(
            "compression-bomb",
            env(headers={"compression": "application/x-gzip"}, body=bomb),
            rejected,
            "compression",
        ),
        Hostile("body-string", env(body=b'"just a string"'), rejected, "body"),
        Hostile("body-object", env(body=b'{"args": []}'), rejected, "body"),
        Hostile("body-args-not-list", env(body=b'[{"a": 1}, {}, {}]'), rejected, "body"),
        Hostile("body-not-json", env(body=b"[[], {"), rejected, "body"),
        Hostile("body-deep-nesting", env(body=b"[" * 100_000 + b"]" * 100_000), rejected, "body"),
        Hostile(
            "pickle",
            env(
                body=pickle.dumps(Canary(canaries / "pickle")),
                content_type="application/x-python-serialize",
            ),
            rejected,
            "content_type",
        ),
        Hostile(
            "yaml",
            env(body=yaml_canary, content_type="application/x-yaml"),
            rejected,
            "content_type",
        ),
        Hostile(
            "msgpack",
            env(body=b"\x93\x90\x80\xc0", content_type="application/x-msgpack"),
            rejected,
            "content_type",
        ),
        Hostile("timelimit-strings", env(headers={"timelimit": ["a", "b"]}), rejected, "header"),
        Hostile("id-not-uuid", env(job_id="not-a-uuid"), rejected, "header"),
        Hostile("priority-abc", env(properties={"priority": "abc"}), rejected, "header"),
        Hostile(
            "no-task-header",
            raw({**body_of, "headers": {"id": str(uuid.uuid4())}}),
            rejected,
            "header",
        ),
        Hostile("eta-garbage", env(headers={"eta": "tomorrow-ish"}), rejected, "header"),
        Hostile("eta-2999", env(headers={"eta": future}), rejected, "header"),
        Hostile("expires-number", env(headers={"expires": 12}), rejected, "header"),
        Hostile("retries-negative", env(headers={"retries": -1}), rejected, "header"),
        Hostile("expired", env(headers={"expires": past}), rejected, "expired"),
        Hostile(
            "unknown-task",
            raw(envelope("tests.e2e_tasks.no_such_task", queue=queue)),
            rejected,
            "unknown_task",
        ),
        Hostile(
            "too-many-args",
            raw(envelope(args=[1, 2, 3], queue=queue)),
            "invalid_payload",
            "InvalidArgumentsError",  # an InvalidPayloadError that is also a TypeError
        ),
        Hostile(
            "wrong-type",
            raw(envelope(RECORD, kwargs={"label": {"not": "a string"}}, queue=queue)),
            "invalid_payload",
            "InvalidPayloadError",
        ),
    ]
