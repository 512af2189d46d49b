"""Request tracing (synth_workers.correlation, synth_workers.tracing) against real Redis,
real Postgres and real worker processes: one request id followed from ``enqueue`` into the
jobs it leads to (their ledger rows, events and log lines), and one OpenTelemetry trace from
the application through the ledger into the workers.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain, chord
from click.testing import CliRunner

import tests.tracing_tasks as tt
from synth_workers import JobHandle, PayloadValidationError, app, enqueue
from synth_workers.cli import main as cli_main
from synth_workers.correlation import (
    HEADER,
    correlation_id,
    current_correlation_id,
    reset_correlation_id,
    set_correlation_id,
)
from synth_workers.deadletter import DeadLetterQueue
from synth_workers.errors import JobFailedError
from synth_workers.events.stream import Event, job_stream
from tests.conftest import REDIS_URL, wait_until

INCLUDE = "tests.e2e_tasks,tests.tracing_tasks"


@pytest.fixture(scope="module")
def memory_spans() -> Any:
    """The test process's spans, in the SDK's in-memory exporter (the global provider can
    be set once per process: this module is its only user)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "a tracer provider was set before"
    from synth_workers import tracing

    assert tracing.enable()  # SYNTH_TRACING_ENABLED=true does this when the app installs
    yield exporter
    provider.shutdown()


def _events(rclient: Any, job_id: str) -> list[Event]:
    return [Event.from_entry(i, f) for i, f in rclient.xrange(job_stream(job_id))]


def _ended(rclient: Any, job_id: str) -> bool:
    return any(e.final for e in _events(rclient, job_id))


def _records(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def _span_id(value: int) -> str:
    return f"0x{value:016x}"


def test_one_request_id_and_one_trace_follow_enqueue_through_two_steps(
    rclient: Any, start_worker: Any, tmp_path: Path, memory_spans: Any
) -> None:
    from opentelemetry import trace

    spans_file = tmp_path / "worker-spans.jsonl"
    worker = start_worker(
        "default",
        env={
            "SYNTH_INCLUDE": INCLUDE,
            "SYNTH_TEST_SPANS": str(spans_file),
            "LOG_LEVEL": "INFO",
            "SYNTH_TRACING_ENABLED": "true",
        },
    )
    rid = f"req-{uuid.uuid4().hex}"
    with trace.get_tracer("tests").start_as_current_span("POST /signup") as root:
        first = enqueue("tests.tracing_tasks.first_step", {"n": 1}, correlation_id=rid)
    assert current_correlation_id() is None  # enqueue's argument sets nothing around it
    second = JobHandle(first.wait(timeout=30))
    assert second.wait(timeout=30) == 20
    jobs = (first.id, second.id)

    # the ledger rows, and the lookup by request id
    assert first.info()["correlation_id"] == rid
    assert second.info()["correlation_id"] == rid
    assert {str(r["id"]) for r in app.ledger.list_jobs(correlation_id=rid)} == set(jobs)
    assert app.ledger.list_jobs(correlation_id=f"req-{uuid.uuid4().hex}") == []

    # every event of both jobs, from queued to succeeded
    assert wait_until(lambda: all(_ended(rclient, j) for j in jobs), timeout=10)
    for job in jobs:
        events = _events(rclient, job)
        kinds = [e.kind for e in events]
        assert kinds == ["queued", "started", "progress", "succeeded"], kinds
        assert {e.correlation_id for e in events} == {rid}
        assert all(e.as_dict()["correlation_id"] == rid for e in events)

    # the per-job lines and the lines the tasks log themselves
    def both_finished() -> bool:
        done = {r.get("job_id") for r in _records(worker.output()) if r["event"] == "job finished"}
        return set(jobs) <= done

    assert wait_until(both_finished, timeout=10), worker.output()
    records = _records(worker.output())
    for job, said in (
        (first.id, "first step working on 1"),
        (second.id, "second step working on 2"),
    ):
        lines = [r for r in records if r.get("job_id") == job]
        assert {"job started", "job finished", said} <= {r["event"] for r in lines}, lines
        assert {r["correlation_id"] for r in lines} == {rid}, lines
    # lines of no job carry no request id
    assert all(r.get("correlation_id") in (None, rid) for r in records)

    # one trace: the application's span, the send, the ledger write and the publish here ...
    trace_id = root.get_span_context().trace_id
    local = [s for s in memory_spans.get_finished_spans() if s.context.trace_id == trace_id]
    by_name = {s.name: s for s in local}
    send = by_name["apply_async/tests.tracing_tasks.first_step"]
    assert send.kind is trace.SpanKind.PRODUCER
    for name in ("apply_async/tests.tracing_tasks.first_step", "synth.ledger.insert",
                 "synth.publish"):  # fmt: skip
        assert by_name[name].parent is not None, name
        assert by_name[name].parent.span_id == root.get_span_context().span_id, name
    assert by_name["synth.ledger.insert"].attributes["synth.job_id"] == first.id

    # ... continued in the worker's processes, through the second step
    def remote() -> list[dict[str, Any]]:
        if not spans_file.exists():
            return []
        found = [json.loads(line) for line in spans_file.read_text().splitlines() if line]
        return [s for s in found if s["context"]["trace_id"] == f"0x{trace_id:032x}"]

    run2 = "run/tests.tracing_tasks.second_step"
    assert wait_until(lambda: any(s["name"] == run2 for s in remote()), timeout=10), (
        spans_file.read_text() if spans_file.exists() else "no spans exported"
    )
    spans = remote()

    def one(name: str, job: str | None = None) -> dict[str, Any]:
        found = [
            s
            for s in spans
            if s["name"] == name and (job is None or s["attributes"].get("synth.job_id") == job)
        ]
        assert len(found) == 1, (name, spans)
        return found[0]

    run1 = one("run/tests.tracing_tasks.first_step")
    assert run1["kind"] == "SpanKind.CONSUMER"
    assert run1["parent_id"] == _span_id(send.context.span_id)
    assert one("synth.ledger.claim", first.id)["parent_id"] == run1["context"]["span_id"]
    send2 = one("apply_async/tests.tracing_tasks.second_step")
    assert send2["parent_id"] == run1["context"]["span_id"]
    assert one("synth.ledger.insert", second.id)["parent_id"] == run1["context"]["span_id"]
    assert one(run2)["parent_id"] == send2["context"]["span_id"]
    assert one("synth.ledger.claim", second.id)["parent_id"] == one(run2)["context"]["span_id"]


def test_chains_fan_out_replays_and_other_producers_keep_the_request_id(
    rclient: Any, start_worker: Any
) -> None:
    start_worker("default", env={"SYNTH_INCLUDE": INCLUDE})
    rid = f"req-{uuid.uuid4().hex}"
    with correlation_id(rid):  # what a request middleware does
        steps = chain(tt.add.s(1, 2), tt.double.s()).apply_async()
        joined = chord([tt.add.s(1, 1), tt.add.s(2, 2)])(tt.total.s())
        fan = enqueue("tests.tracing_tasks.fan_out", {"n": 3})
        dead = enqueue("tests.tracing_tasks.broken", {})
    assert current_correlation_id() is None
    # a producer that is not the platform's, giving the header itself
    plain = Celery("plain", broker=REDIS_URL)
    try:
        adopted = plain.send_task("tests.tracing_tasks.add", (2, 2), headers={HEADER: rid})
    finally:
        plain.close()

    assert steps.get(timeout=30) == 6
    assert joined.get(timeout=30) == 6
    fan.wait(timeout=30)
    with pytest.raises(JobFailedError):
        dead.wait(timeout=30)
    assert JobHandle(adopted.id).wait(timeout=30) == 4

    def tasks_of_request() -> list[str]:
        return sorted(r["task"] for r in app.ledger.list_jobs(correlation_id=rid))

    # the chain's two steps, the chord's two parts and its body (sent by a worker), the
    # fan-out job and its three parts, the dead job, the adopted one
    expected = ["add"] * 4 + ["broken"] + ["double"] * 4 + ["fan_out", "total"]
    expected = [f"tests.tracing_tasks.{t}" for t in expected]
    assert wait_until(lambda: tasks_of_request() == expected, timeout=20), tasks_of_request()
    parts = [r for r in app.ledger.list_jobs(correlation_id=rid) if r["task"].endswith("double")]
    assert wait_until(
        lambda: all(JobHandle(str(p["id"])).state() == "succeeded" for p in parts), timeout=20
    )

    # the dead-letter entry, and its replay made outside any request
    dlq = DeadLetterQueue(app)
    entry = dlq.show(dead.id)
    assert entry is not None and entry["correlation_id"] == rid
    [(original, replayed)] = dlq.replay([dead.id])
    assert original == dead.id
    with pytest.raises(JobFailedError):
        JobHandle(replayed).wait(timeout=30)
    row = JobHandle(replayed).info()
    assert row["correlation_id"] == rid and str(row["replay_of"]) == dead.id
    assert row["message"]["headers"][HEADER] == rid
    assert wait_until(lambda: _ended(rclient, replayed), timeout=10)
    assert {e.correlation_id for e in _events(rclient, replayed)} == {rid}

    # synth-workers jobs list --correlation-id
    result = CliRunner().invoke(cli_main, ["jobs", "list", "--correlation-id", rid, "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert len(listed) == len(expected) + 1
    assert {r["correlation_id"] for r in listed} == {rid}
    assert replayed in {r["id"] for r in listed}


BAD_IDS = ["", "x" * 256, "two\nlines", "nul\x00", "\ud800", 42]


@pytest.mark.parametrize(
    "bad", BAD_IDS, ids=["empty", "long", "newline", "nul", "surrogate", "int"]
)
def test_a_bad_request_id_is_refused_and_nothing_is_queued(rclient: Any, bad: Any) -> None:
    with pytest.raises(PayloadValidationError, match="correlation id"):
        enqueue("tests.tracing_tasks.add", {"x": 1, "y": 2}, correlation_id=bad)
    with pytest.raises(PayloadValidationError, match="correlation id"):
        tt.add.apply_async((1, 2), synth_correlation_id=bad)
    with pytest.raises(PayloadValidationError, match="correlation id"):
        set_correlation_id(bad)
    assert current_correlation_id() is None
    assert app.ledger.list_jobs() == []
    assert rclient.dbsize() == 0  # nothing published, no event written


def test_the_request_id_nests_and_is_restored(rclient: Any) -> None:
    token = set_correlation_id("outer")
    try:
        with correlation_id("inner"):
            assert current_correlation_id() == "inner"
            inner = enqueue("tests.tracing_tasks.add", {"x": 1, "y": 1}, delay=60)
            # an explicit id wins over the current one
            given = enqueue("tests.tracing_tasks.add", {"x": 1, "y": 1}, delay=60,
                            correlation_id="given")  # fmt: skip
        assert current_correlation_id() == "outer"
    finally:
        reset_correlation_id(token)
    assert current_correlation_id() is None
    none = enqueue("tests.tracing_tasks.add", {"x": 1, "y": 1}, delay=60)
    assert inner.info()["correlation_id"] == "inner"
    assert given.info()["correlation_id"] == "given"
    assert none.info()["correlation_id"] is None
    assert HEADER not in none.info()["message"]["headers"]


def test_a_task_run_in_place_keeps_the_callers_request_id(rclient: Any) -> None:
    with correlation_id("in-place"):
        tt.fan_out.apply(kwargs={"n": 2})  # runs here; its two parts are sent as jobs
        assert current_correlation_id() == "in-place"
    parts = app.ledger.list_jobs(task="tests.tracing_tasks.double")
    assert len(parts) == 2
    assert {r["correlation_id"] for r in parts} == {"in-place"}
