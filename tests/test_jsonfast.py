"""kombu's JSON decoding through ``synth_workers.jsonfast``: the same values as kombu's own
``loads`` for every input, including the objects kombu's hook turns into Python types."""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
from typing import Any

import pytest
from kombu.message import Message
from kombu.serialization import registry
from kombu.utils import json as kombu_json

from synth_workers import jsonfast

VALUES: list[Any] = [
    {"a": 1, "b": [1, 2.5, None, True], "c": {"d": "e"}},
    {"when": datetime.datetime(2026, 12, 4, 20, 0, 1, 5, tzinfo=datetime.UTC)},
    {"amount": decimal.Decimal("10.25"), "id": uuid.UUID(int=7)},
    {"raw": b"\x00\x01bytes"},
    {"text": "caf\u00e9 \u2603 \U0001f600", "quote": 'say "hi"\\', "nul": "\x00"},
    [{"__type__": "not kombu's", "x": 1}],
    "plain string",
    12,
    None,
]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_loads_gives_what_kombus_loads_gives(value: Any) -> None:
    text = kombu_json.dumps(value)
    expected = kombu_json.loads(text)
    assert jsonfast.loads(text) == expected
    assert jsonfast.loads(text.encode()) == expected
    assert jsonfast.loads(memoryview(text.encode())) == expected
    assert jsonfast.loads(bytearray(text.encode())) == expected


def test_an_escaped_type_marker_is_still_decoded_by_kombus_hook() -> None:
    # "\u005f\u005ftype\u005f\u005f" is "__type__" in JSON: kombu's hook must see it
    text = (
        '{"\\u005f\\u005ftype\\u005f\\u005f": "datetime", "__value__": "2026-12-04T20:00:00+00:00"}'
    )
    decoded = jsonfast.loads(text)
    assert decoded == datetime.datetime(2026, 12, 4, 20, 0, tzinfo=datetime.UTC)
    assert decoded == kombu_json.loads(text)


@pytest.mark.parametrize("bad", ["", "{", "[1,]", "nan?", '{"a": 1} x'])
def test_bad_json_raises_as_kombus_does(bad: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        kombu_json.loads(bad)
    with pytest.raises(json.JSONDecodeError):
        jsonfast.loads(bad)


def test_registered_as_kombus_json_decoder_message_decode_uses_it() -> None:
    jsonfast.register()
    assert registry._decoders["application/json"] is jsonfast.loads
    body = {"when": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC), "n": [1, 2]}
    message = Message(
        body=kombu_json.dumps(body), content_type="application/json", content_encoding="utf-8"
    )
    assert message.decode() == body


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_dumps_and_body_write_kombus_text(value: Any) -> None:
    from kombu import serialization

    assert jsonfast.dumps(value) == kombu_json.dumps(value)
    assert jsonfast.body(value, "json") == serialization.dumps(value, serializer="json")


def test_body_takes_a_json_serializer_someone_registered_instead_of_kombus() -> None:
    from kombu import serialization

    calls: list[Any] = []

    def custom(obj: Any) -> str:
        calls.append(obj)
        return kombu_json.dumps({"wrapped": obj})

    serialization.register(
        "json", custom, jsonfast.loads, content_type="application/json", content_encoding="utf-8"
    )
    try:
        assert jsonfast.body([1], "json") == ("application/json", "utf-8", '{"wrapped": [1]}')
        assert calls == [[1]]
    finally:
        jsonfast.register()  # kombu's dumps back, as the platform registers it
    assert jsonfast.body([1], "json") == ("application/json", "utf-8", "[1]")
