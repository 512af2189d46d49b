"""kombu's JSON ``loads``, taking the C decoder whenever kombu's hook could not change the result.

kombu decodes every JSON message (a message's envelope where the transport reads it, its
body in ``Message.decode`` and in Celery's pool process) with ``json.loads(s,
object_hook=...)``: a new ``JSONDecoder`` per call and a Python call per JSON object, for a
hook that only turns ``{"__type__": ..., "__value__": ...}`` into a datetime, decimal, UUID or
bytes. That was about a tenth of a worker's main process per job. :func:`loads` gives the
same result: a text that holds neither ``__type__`` nor a ``\\u`` escape (which could spell it)
cannot hold an object the hook changes, and goes to ``json.loads`` with no hook (the C
scanner); any other text goes to kombu's own ``loads``.

:func:`register` puts it in kombu's serializer registry under ``json`` (kombu's ``dumps``
kept), which is what ``Message.decode`` and Celery's request decoding use; the platform's
transport and screening (``synth_workers.screening``) call it directly.

:func:`dumps` is kombu's ``dumps`` with its encoder made once, where kombu's makes one per
call: the same text. :func:`body` serializes a message body as kombu's registry would,
taking :func:`dumps` while the registry's ``json`` is kombu's own. The platform's own sends
use them (``synth_workers.wirelane``, the ledger's rows); kombu's registry keeps its
``dumps``.
"""

from __future__ import annotations

import json
from typing import Any

from kombu import serialization
from kombu.utils import json as kombu_json

_plain = json.JSONDecoder().decode
#: ``kombu.utils.json.dumps(obj)``, with one encoder for every call.
dumps = kombu_json.JSONEncoder().encode


def body(obj: Any, serializer: str) -> tuple[str, str, Any]:
    """``kombu.serialization.dumps(obj, serializer=serializer)``: ``(content type, content
    encoding, data)``."""
    if serializer == "json":
        codec = serialization.registry._encoders.get("json")  # type: ignore[attr-defined]
        if codec is not None and codec.encoder is kombu_json.dumps:
            return codec.content_type, codec.content_encoding, dumps(obj)
    return serialization.dumps(obj, serializer=serializer)


def loads(s: str | bytes | bytearray | memoryview) -> Any:
    """``kombu.utils.json.loads(s)``, faster (see the module's text)."""
    if isinstance(s, memoryview):
        s = s.tobytes().decode("utf-8")
    elif isinstance(s, bytes | bytearray):
        s = s.decode("utf-8")
    if "__type__" in s or "\\u" in s:
        return kombu_json.loads(s)
    return _plain(s)


def register() -> None:
    """Make :func:`loads` kombu's JSON decoder in this process (idempotent)."""
    serialization.register(
        "json",
        kombu_json.dumps,
        loads,
        content_type="application/json",
        content_encoding="utf-8",
    )
