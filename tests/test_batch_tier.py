"""The batch tier end to end: deferrable jobs through the providers' batch APIs, with real
worker processes, Redis and Postgres; the real ``openai`` and ``anthropic`` SDKs call a
loopback server that implements the files, batches and message-batches endpoints
(``tests.fake_batches``)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import chord

from synth_workers import JobHandle, JobState, app, enqueue
from synth_workers.providers import llm
from tasks.orchestration import enqueue_workflow, workflow

from . import batch_tasks
from .conftest import wait_until
from .fake_batches import FakeBatchProviders
from .fake_providers import ANTHROPIC, EMBEDDINGS, OPENAI, answer_for, tokens_of

ASK = "tests.batch_tasks.ask"
ANSWER = "tests.batch_tasks.answer"
MODELS = {"openai": "gpt-test-mini", "anthropic": "claude-test"}
ONLINE = {"openai": OPENAI, "anthropic": ANTHROPIC}
#: Batches sent only when full (SYNTH_BATCH_MAX_ITEMS), never early by age: a test that counts
#: batches must not see one split because a slow machine parked its jobs apart.
FULL = {"SYNTH_BATCH_MAX_AGE": "60"}


@pytest.fixture
def server(rclient: Any) -> Iterator[FakeBatchProviders]:
    with app.ledger.connection() as conn:
        conn.execute(
            "TRUNCATE synth_batch_items, synth_batches, synth_workflows, synth_workflow_parts,"
            " synth_usage"
        )
    fake = FakeBatchProviders()
    yield fake
    if fake.hold_create is not None:
        fake.hold_create.set()
    fake.close()


def _env(server: FakeBatchProviders, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "OPENAI_API_KEY": "sk-test-openai",
        "OPENAI_BASE_URL": f"{server.url}/v1",
        "ANTHROPIC_API_KEY": "sk-ant-test",
        "ANTHROPIC_BASE_URL": server.url,
        "SYNTH_MAIL_OUTBOX": str(tmp_path / "outbox"),
        "SYNTH_MAIL_BACKEND": "file",
        "SYNTH_INCLUDE": "tests.e2e_tasks,tests.batch_tasks",
        "SYNTH_BATCH_TICK": "0.1",
        "SYNTH_BATCH_POLL_INTERVAL": "0.2",
        "SYNTH_BATCH_MAX_AGE": "0.3",
        "SYNTH_BATCH_LEASE": "2",
        **extra,
    }


def _ask(prompt: str, provider: str = "openai", deferrable: bool = True, task: str = ASK) -> str:
    payload = {"prompt": prompt, "provider": provider, "model": MODELS[provider]}
    return enqueue(task, payload, deferrable=deferrable).id


def _rows(sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with app.ledger.connection() as conn:
        return conn.execute(sql, params).fetchall()


def _job(job_id: str) -> dict[str, Any]:
    row = app.ledger.get(job_id)
    assert row is not None
    return row


def _succeeded(ids: list[str]) -> bool:
    rows = _rows(
        "SELECT count(*) FROM synth_jobs WHERE id = ANY(%s::uuid[]) AND state = %s",
        ids,
        JobState.SUCCEEDED,
    )
    return rows[0][0] == len(ids)


def _effects(ids: list[str]) -> dict[str, int]:
    rows = _rows(
        "SELECT job_id::text, count(*) FROM test_duplicates WHERE job_id = ANY(%s::uuid[]) "
        "GROUP BY job_id",
        ids,
    )
    return {r[0]: int(r[1]) for r in rows}


def _credits(provider: str, prompt: str) -> float:
    """What the call costs online (default prices: 1 credit per 1000 tokens each way)."""
    text = answer_for(prompt)
    return llm.credits(app.settings, provider, MODELS[provider], tokens_of(prompt), tokens_of(text))


# --- the happy paths ------------------------------------------------------------------------
@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_deferred_jobs_go_in_one_batch_at_half_price(
    provider: str, server: FakeBatchProviders, start_worker: Any, tmp_path: Path
) -> None:
    server.batch_seconds = 1.0  # long enough to see the jobs parked
    start_worker("default", env=_env(server, tmp_path, **FULL, SYNTH_BATCH_MAX_ITEMS="5"))
    prompts = [f"question {i}" for i in range(5)]
    ids = [_ask(p, provider) for p in prompts]
    # parked: still running in the ledger (Celery: STARTED), no online call made
    assert wait_until(lambda: len(server.provider_batches(provider)) == 1, timeout=30)
    assert all(_job(i)["state"] == JobState.RUNNING for i in ids)
    assert app.AsyncResult(ids[0]).state == "STARTED"
    assert wait_until(lambda: _succeeded(ids), timeout=30)
    assert server.requests(ONLINE[provider]) == []
    batches = server.provider_batches(provider)
    assert len(batches) == 1 and len(batches[0]["items"]) == 5
    assert _effects(ids) == dict.fromkeys(ids, 1)
    for i, prompt in zip(ids, prompts, strict=True):
        row = _job(i)
        assert row["attempt"] == 1 and row["state"] == JobState.SUCCEEDED
        (tokens_in, credits) = _rows(
            "SELECT input_tokens, credits FROM synth_usage WHERE job_id = %s", i
        )[0]
        assert tokens_in == tokens_of(prompt)  # the batch's answer to this job's request
        assert float(credits) == pytest.approx(_credits(provider, prompt) * 0.5)
    # its events: started, parked for the batch, started again with the answer, succeeded
    kinds = [(e.kind, e.data.get("reason")) for e in JobHandle(ids[0]).events(timeout=10)]
    assert [k for k in kinds if k[0] != "progress"] == [
        ("queued", None),
        ("started", None),
        ("scheduled", "batch"),
        ("queued", "outbox"),  # the answer is back: published by the outbox relay
        ("started", None),
        ("succeeded", None),
    ]
    # the ledger's record of the batch
    ((state, items, provider_id),) = _rows(
        "SELECT state, items, provider_batch_id FROM synth_batches"
    )
    assert (state, items, provider_id) == ("ended", 5, batches[0]["id"])


@pytest.mark.parametrize("deferred", ["some", "all"])
def test_chord_fans_in_with_deferred_parts(
    deferred: str, server: FakeBatchProviders, start_worker: Any, tmp_path: Path
) -> None:
    start_worker("default", concurrency=2, env=_env(server, tmp_path))
    prompts = [f"part {i}" for i in range(4)]
    header = [
        batch_tasks.answer.s(p).set(synth_deferrable=deferred == "all" or i % 2 == 0)
        for i, p in enumerate(prompts)
    ]
    result = chord(header)(batch_tasks.collect.s())
    assert result.get(timeout=60) == [answer_for(p) for p in prompts]
    online = len(server.requests(OPENAI))
    batched = sum(len(b["items"]) for b in server.provider_batches("openai"))
    assert (online, batched) == ((0, 4) if deferred == "all" else (2, 2))


def test_deferrable_workflow_fans_in_through_batches(
    server: FakeBatchProviders, start_worker: Any, tmp_path: Path
) -> None:
    env = _env(server, tmp_path, SYNTH_BATCH_MAX_ITEMS="4", SYNTH_BATCH_MAX_AGE="3")
    start_worker("orchestration", "email", env=env)
    handle = enqueue_workflow(
        {
            "documents": [{"id": f"d{i}", "text": f"document {i}"} for i in range(4)],
            "instruction": "Summarize.",
            "provider": "anthropic",
            "model": MODELS["anthropic"],
            "aggregate_instruction": "Combine.",
            "deferrable": True,
        }
    )
    result = handle.wait(timeout=60)
    assert len(result["outputs"]) == 4 and result["summary"].startswith("SUMMARY<")
    assert server.requests(ANTHROPIC) == []
    sizes = sorted(len(b["items"]) for b in server.provider_batches("anthropic"))
    assert sizes == [1, 4]  # the parts, then the aggregate
    row = workflow(handle.id)
    assert row is not None and row["done"] == 4
    (n,) = _rows("SELECT count(*) FROM synth_usage WHERE workflow_id = %s", handle.id)[0]
    assert n == 5


def test_deferrable_openai_embeddings(
    server: FakeBatchProviders, start_worker: Any, tmp_path: Path
) -> None:
    env = _env(
        server,
        tmp_path,
        SYNTH_EMBED_PROVIDER="openai",
        SYNTH_EMBED_MODEL="text-embedding-test",
        SYNTH_BATCH_MAX_ITEMS="3",
        **FULL,
    )
    start_worker("embeddings", pool="threads", concurrency=4, env=env)
    docs = [[{"id": f"doc-{j}-{i}", "text": f"text {j} {i}"} for i in range(2)] for j in range(3)]
    handles = [
        enqueue("tasks.embeddings.index_documents", {"documents": d}, deferrable=True) for d in docs
    ]
    results = [h.wait(timeout=60) for h in handles]
    assert server.requests(EMBEDDINGS) == []
    (batch,) = server.provider_batches("openai")
    assert batch["endpoint"] == "/v1/embeddings" and len(batch["items"]) == 3
    for result in results:
        assert result["points"] == 2 and result["batch"] is True
        assert result["input_tokens"] == 2 and result["credits"] == pytest.approx(0.001)


# --- errors, expiry, quotas -----------------------------------------------------------------
def test_a_request_the_batch_refused_retries_or_dead_letters(
    server: FakeBatchProviders, start_worker: Any, tmp_path: Path
) -> None:
    start_worker("default", env=_env(server, tmp_path))
    once = _ask("BATCH-ERROR-500-ONCE please")
    refused = _ask("BATCH-ERROR-400 please")
    fine = _ask("a fine question")
    assert wait_until(lambda: _succeeded([once, fine]), timeout=60)
    assert wait_until(lambda: _job(refused)["state"] == JobState.DEAD, timeout=30)
    assert _job(refused)["error_class"] == "ProviderRejectedError"
    assert (_job(once)["attempt"], _job(once)["retries"]) == (2, 1)
    assert _effects([once, fine, refused]) == {once: 1, fine: 1}
    assert server.requests(OPENAI) == []  # the retry went to a batch again


@pytest.mark.parametrize(("provider", "then"), [("openai", "batch"), ("anthropic", "online")])
def test_a_batch_that_expires_half_done_gives_the_rest_back(
    provider: str, then: str, server: FakeBatchProviders, start_worker: Any, tmp_path: Path
) -> None:
    server.modes.append("expire_half")
    server.batch_seconds = 0.5
    deadline = "1" if then == "online" else "172800"
    env = _env(
        server, tmp_path, SYNTH_BATCH_MAX_ITEMS="6", SYNTH_BATCH_MAX_AGE="3",
        SYNTH_BATCH_DEADLINE=deadline,
    )  # fmt: skip
    start_worker("default", concurrency=2, env=env)
    prompts = [f"q{i}" for i in range(6)]
    ids = [_ask(p, provider, task=ANSWER) for p in prompts]
    assert [app.AsyncResult(i).get(timeout=60) for i in ids] == [answer_for(p) for p in prompts]
    batches = sorted(server.provider_batches(provider), key=lambda b: b["created"])
    first = [c for c, _, _ in batches[0]["items"]]
    assert len(first) == 6
    if then == "batch":
        assert len(batches) == 2 and len(batches[1]["items"]) == 3
        assert server.requests(ONLINE[provider]) == []
    else:
        assert len(batches) == 1 and len(server.requests(ONLINE[provider])) == 3
    returned = sorted(r[0] for r in _rows("SELECT returned FROM synth_batch_items"))
    assert returned == [0, 0, 0, 1, 1, 1]
    credits = sorted(float(r[0]) for r in _rows("SELECT credits FROM synth_usage"))
    full = _credits(provider, "q0")
    expected = [full * 0.5] * 6 if then == "batch" else [full * 0.5] * 3 + [full] * 3
    assert credits == pytest.approx(expected)


def test_the_governor_counts_batches_not_online_requests(
    server: FakeBatchProviders, start_worker: Any, tmp_path: Path
) -> None:
    env = _env(
        server,
        tmp_path,
        SYNTH_LLM_REQUESTS_PER_WINDOW="1",
        SYNTH_LLM_QUOTA_WINDOW="60",
        SYNTH_BATCH_MAX_ITEMS="3",
        SYNTH_BATCH_LIMITS='{"openai:*": {"batches": 1}}',
        **FULL,
    )
    start_worker("default", concurrency=2, env=env)
    ids = [_ask(f"b{i}") for i in range(6)]
    assert wait_until(lambda: sum(_succeeded([i]) for i in ids) == 3, timeout=30)
    # the online quota (1 request a minute) is untouched by the batch: a call goes at once
    online = _ask("right now", deferrable=False)
    assert wait_until(lambda: _succeeded([online]), timeout=10)
    # the other three wait for the next window: one batch a minute
    assert wait_until(
        lambda: (
            _rows(
                "SELECT count(*) FROM synth_batch_items WHERE state = 'pending' "
                "AND created_at < now() - interval '2 seconds'"
            )[0][0]
            == 3
        ),
        timeout=30,
    )
    assert len(server.provider_batches("openai")) == 1
    assert len(server.requests(OPENAI)) == 1


@pytest.mark.parametrize("limit", ['{"openai:*": {"requests": 2}}', '{"openai:*": {"tokens": 70}}'])
def test_open_batches_stay_within_the_batch_queue_limits(
    limit: str, server: FakeBatchProviders, start_worker: Any, tmp_path: Path
) -> None:
    server.batch_seconds = 0.5
    env = _env(
        server, tmp_path, SYNTH_BATCH_MAX_ITEMS="10", SYNTH_BATCH_MAX_AGE="1.5",
        SYNTH_BATCH_LIMITS=limit,
    )  # fmt: skip
    start_worker("default", concurrency=2, env=env)
    ids = [_ask(f"t{i}") for i in range(4)]  # about 33 tokens each (prompt and max_tokens)
    assert wait_until(lambda: _succeeded(ids), timeout=60)
    batches = sorted(server.provider_batches("openai"), key=lambda b: b["created"])
    assert sum(len(b["items"]) for b in batches) == 4 and len(batches) >= 2
    for batch in batches:  # never more than two requests in open batches
        open_then = [
            b for b in batches if b["created"] <= batch["created"] < b.get("ended_at", 1e12)
        ]
        assert sum(len(b["items"]) for b in open_then) <= 2


def test_a_task_option_defers_and_a_parked_job_can_be_cancelled(
    server: FakeBatchProviders, start_worker: Any, tmp_path: Path
) -> None:
    server.batch_seconds = 1.0
    start_worker("default", env=_env(server, tmp_path, **FULL, SYNTH_BATCH_MAX_ITEMS="2"))
    kept = enqueue("tests.batch_tasks.always_deferred", {"prompt": "kept"})
    dropped = enqueue("tests.batch_tasks.always_deferred", {"prompt": "dropped"})
    assert wait_until(lambda: len(server.provider_batches("openai")) == 1, timeout=30)
    assert dropped.cancel() is False  # running (parked): asked to stop
    assert wait_until(lambda: _job(dropped.id)["state"] == JobState.CANCELLED, timeout=30)
    assert wait_until(lambda: _succeeded([kept.id]), timeout=30)
    assert _effects([kept.id, dropped.id]) == {kept.id: 1}
    assert server.requests(OPENAI) == []


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_failed_batch_creation_is_looked_up_then_sent_once(
    provider: str, server: FakeBatchProviders, start_worker: Any, tmp_path: Path
) -> None:
    server.fail_creates = 2
    start_worker("default", env=_env(server, tmp_path, **FULL, SYNTH_BATCH_MAX_ITEMS="3"))
    ids = [_ask(f"f{i}", provider) for i in range(3)]
    assert wait_until(lambda: _succeeded(ids), timeout=60)
    assert len(server.provider_batches(provider)) == 1
    create = "/v1/batches" if provider == "openai" else "/v1/messages/batches"
    posts = [r for r in server.requests(create) if r.body == "POST"]  # body: the method
    assert len(posts) == 3  # two 500s, then the one batch
    assert _effects(ids) == dict.fromkeys(ids, 1)


# --- SIGKILL at each step -------------------------------------------------------------------
def _kill(worker: Any) -> None:
    os.killpg(worker.process.pid, signal.SIGKILL)
    worker.process.wait(10)


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_sigkill_between_submitting_and_recording_sends_no_second_batch(
    provider: str, server: FakeBatchProviders, start_worker: Any, tmp_path: Path
) -> None:
    server.hold_create = threading.Event()
    env = _env(server, tmp_path, **FULL, SYNTH_BATCH_MAX_ITEMS="4")
    first = start_worker("default", env=env)
    ids = [_ask(f"k{i}", provider) for i in range(4)]
    assert server.created.wait(30)  # the provider has the batch; the answer is held
    _kill(first)
    server.hold_create.set()
    ((state, recorded),) = _rows("SELECT state, provider_batch_id FROM synth_batches")
    assert (state, recorded) == ("submitting", None)
    start_worker("default", env=env)
    assert wait_until(lambda: _succeeded(ids), timeout=60)
    (batch,) = server.provider_batches(provider)
    ((state, recorded),) = _rows("SELECT state, provider_batch_id FROM synth_batches")
    assert (state, recorded) == ("ended", batch["id"])
    assert _effects(ids) == dict.fromkeys(ids, 1)
    assert server.requests(ONLINE[provider]) == []


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_sigkill_while_writing_results_back_applies_each_once(
    provider: str,
    server: FakeBatchProviders,
    start_worker: Any,
    tmp_path: Path,
    database_url: str,
) -> None:
    server.batch_seconds = 1.5
    env = _env(server, tmp_path, **FULL, SYNTH_BATCH_MAX_ITEMS="6", SYNTH_BATCH_APPLY_CHUNK="1")
    first = start_worker("default", env=env)
    ids = [_ask(f"w{i}", provider) for i in range(6)]
    assert wait_until(lambda: len(server.provider_batches(provider)) == 1, timeout=30)
    order = [c for c, _, _ in server.provider_batches(provider)[0]["items"]]
    job_of = dict(_rows("SELECT custom_id, job_id::text FROM synth_batch_items"))
    blocker = psycopg.connect(database_url, options=f"-c search_path={app.settings.db_schema}")
    try:
        # hold the fourth job's row: the applier writes three results, then waits on it
        blocker.execute("SELECT 1 FROM synth_jobs WHERE id = %s FOR UPDATE", (job_of[order[3]],))
        assert wait_until(
            lambda: _rows("SELECT count(*) FROM synth_batch_items WHERE state = 'done'")[0][0] == 3,
            timeout=30,
        )
        assert wait_until(
            lambda: (
                _rows(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'UPDATE synth_jobs%%'"
                )[0][0]
                >= 1
            ),
            timeout=10,
        )
        _kill(first)
    finally:
        blocker.rollback()
        blocker.close()
    start_worker("default", env=env)
    assert wait_until(lambda: _succeeded(ids), timeout=60)
    assert _effects(ids) == dict.fromkeys(ids, 1)
    assert len(server.provider_batches(provider)) == 1
    assert _rows("SELECT count(*) FROM synth_batch_items WHERE state = 'done'")[0][0] == 6
    assert server.requests(ONLINE[provider]) == []
    assert _rows("SELECT state FROM synth_batches")[0][0] == "ended"
