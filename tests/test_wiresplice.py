"""Siblings' texts made from one encoding (``synth_workers.wiresplice``): a bulk send's Redis
entries and ledger messages are, byte for byte, the texts each message encoded whole gives;
a sibling unlike its first, or a first whose own values hold a marker, is encoded whole.
Also: the lane's packing is redis-py's, and an event's fields are split as written."""

from __future__ import annotations

import copy
import itertools
import json
import re
import uuid
from typing import Any

import pytest
import redis

from synth_workers import app, wire, wirelane, wiremany, wiresplice
from synth_workers.bulkrows import _json
from synth_workers.events.stream import FAILURE_KINDS, SEP, EventWriter, job_stream
from synth_workers.ledger.early import EARLY
from synth_workers.lifecycle import JobEvent
from synth_workers.states import EventKind

QUEUE = "splice-test"
pytestmark = pytest.mark.usefixtures("no_publish_receivers")
TAG = re.compile(r'"delivery_tag": "[0-9a-f-]{36}"')


def _task(name: str) -> Any:
    app.loader.import_default_modules()
    return app.tasks[name]


def _family(
    items: list[tuple[Any, Any]], options: dict[str, Any] | None = None, grouped: bool = False
) -> list[wire.Outgoing]:
    """A first message and its siblings, as ``enqueue_many`` and a bulk group make them."""
    task = _task("tests.e2e_tasks.record")
    sent = {"queue": QUEUE, "priority": 3, **(options or {})}
    ids = [str(uuid.uuid4()) for _ in items]
    group = (str(uuid.uuid4()), 0) if grouped else None
    first = wire.build(task, items[0][0], items[0][1], {**sent, "task_id": ids[0]}, group)
    assert first is not None
    return [first] + [
        wiremany.sibling(first, app, job_id, a, k, group_index=n if grouped else None)
        for n, (job_id, (a, k)) in enumerate(zip(ids[1:], items[1:], strict=True), 1)
    ]


def _whole(outs: list[wire.Outgoing]) -> list[wire.Outgoing]:
    """The same messages, none of them a sibling: each encoded whole."""
    alone = []
    for out in outs:
        twin = copy.copy(out)
        twin.family = None
        alone.append(twin)
    return alone


def _untagged(raws: list[tuple[str, str]] | None) -> list[tuple[str, str]]:
    assert raws is not None
    return [(key, TAG.sub('"delivery_tag": "-"', text)) for key, text in raws]


ITEMS = [
    ((), {"label": "plain"}),
    ((), {"label": 'it\'s \u2603 "quoted" \\ \n'}),
    ((1, "two", [3.5, None]), {"label": "x" * 300}),
    ((), {}),
]


@pytest.mark.parametrize(
    ("options", "grouped", "early"),
    [({}, False, False), ({"headers": {"h": "v"}}, False, True), ({}, True, False)],
)
def test_siblings_texts_are_each_message_encoded_whole(
    options: dict[str, Any], grouped: bool, early: bool
) -> None:
    outs = _family(ITEMS * 3, options, grouped)
    if early:  # as bulkrows._mark marks an overlapped send's messages
        for out in outs:
            out.properties = {**out.properties, EARLY: True}
    way = wirelane.lane(app)
    assert way is not None
    spliced, whole = way.raws(outs), way.raws(_whole(outs))
    assert _untagged(spliced) == _untagged(whole)
    assert spliced is not None and len({t for _k, t in spliced}) == len(outs)
    for (_key, text), out in zip(spliced, outs, strict=True):
        assert json.loads(text)["headers"]["id"] == out.job_id
    assert wire.stored_texts(outs, _json) == [_json(out.stored()) for out in outs]


def test_a_sibling_unlike_its_first_is_encoded_whole() -> None:
    outs = _family(ITEMS * 2)
    outs[2].headers = {**outs[2].headers, "extra": 1}  # another header name
    outs[3].properties = {**outs[3].properties, "reply_to": "elsewhere"}
    outs[4].headers = {**outs[4].headers, "group_index": 4}  # a group's member among others
    outs[5].headers = {**outs[5].headers, "argsrepr": None}  # a value of another type
    way = wirelane.lane(app)
    assert way is not None
    assert _untagged(way.raws(outs)) == _untagged(way.raws(_whole(outs)))
    assert wire.stored_texts(outs, _json) == [_json(out.stored()) for out in outs]
    assert json.loads(wire.stored_texts(outs, _json)[3])["properties"]["reply_to"] == "elsewhere"


def test_a_first_message_holding_a_marker_has_its_family_encoded_whole() -> None:
    outs = _family(ITEMS, {"headers": {"h": wiresplice.mark("id")}})
    way = wirelane.lane(app)
    assert way is not None
    raws = way.raws(outs)
    assert _untagged(raws) == _untagged(way.raws(_whole(outs)))
    assert raws is not None
    assert json.loads(raws[1][1])["headers"]["h"] == wiresplice.mark("id")
    assert wire.stored_texts(outs, _json) == [_json(out.stored()) for out in outs]


def test_a_template_needs_each_marker_once_and_takes_strings_and_ints() -> None:
    mark = wiresplice.mark
    made = wiresplice.template({"a": mark("x"), "b": [mark("y"), 1]}, ["x", "y"], json.dumps)
    assert made is not None
    assert made.fill({"x": 'é"', "y": 12}) == json.dumps({"a": 'é"', "b": [12, 1]})
    assert wiresplice.template({"a": mark("x")}, ["x", "y"], json.dumps) is None
    assert wiresplice.template({"a": mark("x"), "b": mark("x")}, ["x"], json.dumps) is None
    with pytest.raises(TypeError):
        made.fill({"x": True, "y": 1})
    with pytest.raises(TypeError):
        made.fill({"x": None, "y": 1})


def test_the_lane_packs_commands_as_redis_py_does(rclient: Any) -> None:
    way = wirelane.lane(app)
    assert way is not None
    conn = way.client.connection_pool.get_connection()
    try:
        commands = [("LPUSH", "k", "é", b"\x00\xff", 7, 0.25), ("SET", "a b", "1")]
        assert b"".join(wirelane._packed(conn, commands)) == b"".join(conn.pack_commands(commands))
        with pytest.raises(redis.DataError):  # a bool: refused as redis-py refuses it
            wirelane._packed(conn, [("SET", "k", True)])
    finally:
        way.client.connection_pool.release(conn)
    replies = way.execute(
        [("RPUSH", f"{QUEUE}:packed", "é", 7), ("LRANGE", f"{QUEUE}:packed", 0, -1)]
    )
    assert replies[1] == ["é".encode(), b"7"]


def test_an_event_field_holding_the_separator_is_written_with_a_space(rclient: Any) -> None:
    writer = EventWriter(rclient, retention=60, maxlen=100, job_ttl=60)
    job_id = str(uuid.uuid4())
    for kind, corr in zip(
        (EventKind.QUEUED, EventKind.STARTED), (f"a{SEP}b", "plain"), strict=True
    ):
        writer.write([JobEvent(kind, job_id, task=f"t{SEP}x", queue="q", correlation_id=corr)])
    entries = rclient.xrange(job_stream(job_id))
    fields = [{k.decode(): v.decode() for k, v in f.items()} for _id, f in entries]
    assert [f["kind"] for f in fields] == ["queued", "started"]
    assert [f["task"] for f in fields] == ["t x", "t x"]
    assert [f["corr"] for f in fields] == ["a b", "plain"]
    assert list(itertools.chain.from_iterable(f.keys() for f in fields)).count("job") == 2


def test_events_sharing_one_data_mapping_and_temporary_ones_each_get_their_own_text(
    rclient: Any,
) -> None:
    writer = EventWriter(rclient, retention=60, maxlen=100, job_ttl=60)
    shared = {"priority": 5}
    kind = sorted(FAILURE_KINDS)[0]
    events = [
        JobEvent(EventKind.QUEUED, str(uuid.uuid4()), data=shared),
        JobEvent(EventKind.QUEUED, str(uuid.uuid4()), data=shared),
        # each failure event makes a temporary mapping of its own (the "failed" entry)
        *(
            JobEvent(kind, str(uuid.uuid4()), data={"failure_class": f"c{n}", "error_class": "E"})
            for n in range(6)
        ),
    ]
    _keys, args = writer.command(events)
    texts = [dict(zip(*[iter(a.split(SEP))] * 2, strict=True)).get("data") for a in args[10::4]]
    alone = [
        dict(zip(*[iter(a.split(SEP))] * 2, strict=True)).get("data")
        for event in events
        for a in EventWriter._args(event)[3::4]
    ]
    assert texts == alone
    assert texts[:2] == [json.dumps(shared, separators=(",", ":"))] * 2
    failed = [json.loads(t)["failure_class"] for t in texts[2::2]]
    assert failed == [f"c{n}" for n in range(6)]


def test_a_first_message_with_no_correlation_id_or_ids_has_its_family_encoded_whole() -> None:
    way = wirelane.lane(app)
    assert way is not None
    outs = _family(ITEMS)
    outs[0].properties = {**outs[0].properties, "correlation_id": None}
    assert _untagged(way.raws(outs)) == _untagged(way.raws(_whole(outs)))
    assert wire.stored_texts(outs, _json) == [_json(out.stored()) for out in outs]
    outs = _family(ITEMS)
    for out in outs:
        out.headers = {k: v for k, v in out.headers.items() if k != "root_id"}
    assert _untagged(way.raws(outs)) == _untagged(way.raws(_whole(outs)))
    assert wire.stored_texts(outs, _json) == [_json(out.stored()) for out in outs]
