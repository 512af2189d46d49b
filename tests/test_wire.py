"""The fast send (``synth_workers.wire``) writes what Celery and kombu would write: the same
ledger message as Celery's own ``apply_async`` builds, and the same Redis list entry as
kombu's publish pushes (real Redis), only the per-message ids differing. Also: Celery's
``saferepr`` and :func:`fast_saferepr` agree, and one enqueue is one Redis round trip."""

from __future__ import annotations

import base64
import json
import random
import string
import threading
import uuid
from typing import Any

import celery
import pytest
from celery import signals
from celery.utils.saferepr import saferepr

from synth_workers import app, enqueue, wire
from synth_workers.message import PROTOCOL2_HEADERS, CaptureProducer, for_publish, stored
from synth_workers.reprs import fast_saferepr

QUEUE = "wire-test"


pytestmark = pytest.mark.usefixtures("no_publish_receivers")


def _task(name: str) -> Any:
    app.loader.import_default_modules()
    return app.tasks[name]


def _celery_capture(task: Any, args: Any, kwargs: Any, **options: Any) -> CaptureProducer:
    capture = CaptureProducer()
    celery.Task.apply_async(task, args, kwargs, producer=capture, **options)
    return capture


def _only_entry(rclient: Any, prefix: str = "") -> tuple[str, dict[str, Any]]:
    keys = [k.decode() for k in rclient.keys(f"{prefix}{QUEUE}*")]
    assert len(keys) == 1, keys
    items = rclient.lrange(keys[0], 0, -1)
    assert len(items) == 1
    rclient.delete(keys[0])
    return keys[0], json.loads(items[0])


def _comparable(entry: dict[str, Any]) -> dict[str, Any]:
    entry = json.loads(json.dumps(entry))
    entry["properties"].pop("delivery_tag")  # a fresh uuid per publish, in kombu too
    entry["body"] = json.loads(base64.b64decode(entry["body"]))
    return entry


CASES = [
    ("tests.e2e_tasks.record", (), {"label": 'it\'s \u2603 "quoted"'}, {"priority": 3}),
    ("tests.e2e_tasks.record", (), {"label": "x"}, {"priority": 0, "headers": {"h": "v"}}),
    ("tests.e2e_tasks.slow_hard", (), {}, {"priority": 9}),
    ("tests.e2e_tasks.slow_soft", (), {}, {"priority": 5}),
    ("tests.e2e_tasks.effect", (3,), {"sleep": 0.5}, {"priority": 4}),
]


@pytest.mark.parametrize(("name", "args", "kwargs", "options"), CASES)
def test_message_and_redis_entry_are_celerys(
    rclient: Any, name: str, args: Any, kwargs: Any, options: dict[str, Any]
) -> None:
    task = _task(name)
    # the first send of its shape (kombu's prepare_message makes its envelope), then a second
    # (synth_workers.wirelane reuses that envelope with the message's own parts)
    for _nth in range(2):
        job_id = str(uuid.uuid4())
        sent = {"task_id": job_id, "queue": QUEUE, **options}
        out = wire.build(task, args, kwargs, dict(sent))
        assert out is not None
        # the ledger's message: as Celery's own apply_async builds it
        assert out.stored() == _celery_capture(task, args, kwargs, **sent).message()
        # the Redis entry: as kombu's publish pushes it, to the same priority list
        wire.publish(app, [out], app.ledger.lifecycle, [])
        fast_key, fast = _only_entry(rclient)
        celery.Task.apply_async(task, args, kwargs, **sent)
        kombu_key, kombu = _only_entry(rclient)
        assert fast_key == kombu_key
        assert _comparable(fast) == _comparable(kombu)


def test_sends_it_cannot_build_go_through_celery() -> None:
    task = _task("tests.e2e_tasks.record")
    base = {"task_id": str(uuid.uuid4()), "queue": QUEUE, "priority": 1}
    assert wire.build(task, (), {"label": "x"}, base) is not None
    for extra in ({"link": None}, {"expires": 10}, {"countdown": 1}, {"shadow": "s"}):
        assert wire.build(task, (), {"label": "x"}, {**base, **extra}) is None

    def receiver(**_: Any) -> None:
        pass

    signals.before_task_publish.connect(receiver)
    try:
        assert wire.build(task, (), {"label": "x"}, base) is None
    finally:
        signals.before_task_publish.disconnect(receiver)


def _value(rnd: random.Random, depth: int) -> Any:
    r = rnd.random()
    if depth > 4 or r < 0.5:
        scalars = [
            lambda: "".join(rnd.choice(string.printable + "'\"\u00e9\\\u2603") for _ in range(9)),
            lambda: rnd.randint(-(10**9), 10**9),
            lambda: rnd.random() * 1e3,
            lambda: None,
            lambda: rnd.random() < 0.5,
        ]
        return rnd.choice(scalars)()
    if r < 0.7:
        return [_value(rnd, depth + 1) for _ in range(rnd.randint(0, 4))]
    if r < 0.8:
        return tuple(_value(rnd, depth + 1) for _ in range(rnd.randint(0, 3)))
    letters = string.ascii_letters + "'"
    return {
        "".join(rnd.choice(letters) for _ in range(rnd.randint(0, 5))): _value(rnd, depth + 1)
        for _ in range(rnd.randint(0, 4))
    }


def test_fast_saferepr_is_celerys() -> None:
    rnd = random.Random(14)
    for _ in range(3000):
        value = _value(rnd, 0)
        for maxlen in (1024, 40):
            for levels in (3, 1, 0):
                assert fast_saferepr(value, maxlen, levels) == saferepr(value, maxlen, levels)
    odd = [b"bytes", {1: "int key"}, {"s": {1, 2}}, "x" * 2000]
    for value in odd:
        assert fast_saferepr(value, 1024, 3) == saferepr(value, 1024, 3)


def test_one_enqueue_is_one_redis_round_trip(rclient: Any) -> None:
    """The queued event and the message go in one write to Redis per enqueue (one
    ``send_packed_command``), holding the event script call and the LPUSH."""
    from redis.connection import AbstractConnection

    enqueue("tests.e2e_tasks.record", {"label": "warm"}, queue=QUEUE)  # declares the queue
    before = rclient.xlen("synth:events:all")
    writes: list[int] = []
    real = AbstractConnection.send_packed_command

    me = threading.get_ident()

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        if threading.get_ident() == me:  # not the background writers of other apps
            writes.append(b"".join(command)[:60] if isinstance(command, list) else command[:60])
        real(self, command, check_health)

    AbstractConnection.send_packed_command = counting  # type: ignore[method-assign]
    try:
        for i in range(5):
            enqueue("tests.e2e_tasks.record", {"label": f"n{i}"}, queue=QUEUE)
    finally:
        AbstractConnection.send_packed_command = real  # type: ignore[method-assign]
    assert len(writes) == 5, [w.replace(b"\r\n", b" ") for w in writes]
    assert rclient.xlen("synth:events:all") == before + 5
    assert sum(rclient.llen(k) for k in rclient.keys(f"{QUEUE}*")) == 6


def test_the_stored_message_leaves_out_celerys_nulls_and_the_resent_one_has_them_back() -> None:
    """The ledger keeps a message without the ``None`` values of Celery's own headers and
    canvas keys (a row is copied whole by each of its updates); sending it again puts them
    back, so the worker gets what Celery sent but for id, retries and eta."""
    sig = celery.signature("t.x", args=(1,), kwargs={"a": 2}, app=app)
    sig.link(celery.signature("t.y", app=app))
    capture = CaptureProducer()
    app.send_task("t.x", args=(1,), kwargs={"a": 2}, link=sig.options["link"],
                  producer=capture, headers={"custom": None})  # fmt: skip
    assert capture.publish_kwargs is not None
    sent_headers = capture.publish_kwargs["headers"]
    kept = stored(sent_headers, capture.body, capture.publish_kwargs)
    assert "parent_id" not in kept["headers"] and sent_headers["parent_id"] is None
    assert kept["headers"]["custom"] is None  # not Celery's: kept as sent
    assert "chain" not in kept["embed"] and kept["embed"]["callbacks"]
    headers, _, body = for_publish(kept, sent_headers["id"], 0, [1], {"a": 2})
    assert set(PROTOCOL2_HEADERS) <= set(headers)
    assert {**headers, "eta": None} == {**sent_headers, "retries": 0, "eta": None}
    assert body == ([1], {"a": 2}, dict(capture.body[2]))


def test_a_global_key_prefix_is_applied_as_kombus_prefixed_client_applies_it(
    rclient: Any, redis_url: str
) -> None:
    """With kombu's ``global_keyprefix`` the fast send pushes to the prefixed list, the
    entry the same as kombu's own publish through the same prefixed broker."""
    prefixed = celery.Celery(
        "prefixed", broker=redis_url, broker_transport_options={"global_keyprefix": "pfx:"}
    )
    task = _task("tests.e2e_tasks.record")
    try:
        for _nth in range(2):
            sent = {"task_id": str(uuid.uuid4()), "queue": QUEUE, "priority": 2}
            out = wire.build(task, (), {"label": "p"}, dict(sent))
            assert out is not None
            wire.publish(prefixed, [out], app.ledger.lifecycle, [])
            fast_key, fast = _only_entry(rclient, "pfx:")
            with prefixed.producer_or_acquire(None) as producer:
                wire._kombu_publish(producer, out)  # kombu's own Producer.publish
            kombu_key, kombu = _only_entry(rclient, "pfx:")
            assert fast_key == kombu_key
            assert _comparable(fast) == _comparable(kombu)
    finally:
        prefixed.close()


def test_a_forked_child_sends_on_a_lane_of_its_own(rclient: Any) -> None:
    """The broker's Redis kept between sends (``synth_workers.wirelane``) is per process: a
    forked child (a prefork pool's process, a job enqueueing another) makes its own lane,
    with its own client, and its message lands; the parent's lane stays the parent's."""
    import multiprocessing
    import os

    from synth_workers import wirelane

    enqueue("tests.e2e_tasks.record", {"label": "parent"}, queue=QUEUE)
    parent = wirelane.lane(app)
    assert parent is not None
    assert wirelane.lane(app) is parent  # kept between sends
    ctx = multiprocessing.get_context("fork")
    answers = ctx.Queue()

    def child() -> None:
        try:
            enqueue("tests.e2e_tasks.record", {"label": "child"}, queue=QUEUE)
            own = wirelane.lane(app)
            assert own is not None
            answers.put(
                (own is not parent, own.pid == os.getpid(), own.client is not parent.client)
            )
        except BaseException as exc:
            answers.put(repr(exc))

    proc = ctx.Process(target=child)
    proc.start()
    try:
        assert answers.get(timeout=60) == (True, True, True)
    finally:
        proc.join(10)
    assert wirelane.lane(app) is parent
    enqueue("tests.e2e_tasks.record", {"label": "parent again"}, queue=QUEUE)
    assert sum(rclient.llen(k) for k in rclient.keys(f"{QUEUE}*")) == 3


def test_a_broker_that_is_not_kombus_redis_gets_kombus_own_publish() -> None:
    """No lane for another transport (``wirelane.lane`` is ``None``): kombu's own
    ``Producer.publish`` sends the message, and it arrives as Celery would have sent it."""
    from synth_workers import wirelane

    other = celery.Celery("other", broker="memory://")
    task = _task("tests.e2e_tasks.record")
    try:
        sent = {"task_id": str(uuid.uuid4()), "queue": QUEUE, "priority": 3}
        out = wire.build(task, (), {"label": "m"}, dict(sent))
        assert out is not None
        assert wirelane.lane(other) is None
        wire.publish(other, [out], app.ledger.lifecycle, [])
        with other.connection_for_read() as conn, conn.SimpleQueue(QUEUE) as queue:
            message = queue.get(timeout=5)
            assert message.headers["id"] == sent["task_id"]
            assert message.decode()[1] == {"label": "m"}
            message.ack()
    finally:
        other.close()
