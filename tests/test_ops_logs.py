"""Structured logs: JSON lines, redaction, LOG_LEVEL, one line per job start and end."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import structlog

from synth_workers import Settings, enqueue
from synth_workers.logging import REDACTED, configure_logging, redact

from .conftest import wait_until

SECRETS = ("hunter2-pw", "123-45-6789", "sk-live-abcdefghijklmnop1234", "tok_abcdef123456")


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


_ROOT_LEVEL = logging.getLogger().level


def _restore_root() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == "synth-workers":
            root.removeHandler(handler)
    root.setLevel(_ROOT_LEVEL)
    structlog.reset_defaults()


def test_secrets_and_configured_fields_are_redacted_everywhere() -> None:
    stream = io.StringIO()
    settings = Settings(redact_fields=["ssn", "Card-Number"])
    configure_logging(settings, stream=stream, json_lines=True)
    try:
        log = structlog.get_logger("test.redaction")
        log.info(
            "enqueue",
            payload={"to": "a@example.com", "ssn": SECRETS[1], "nested": [{"card_number": "4111"}]},
            password=SECRETS[0],
            headers={"Authorization": f"Bearer {SECRETS[3]}", "Accept": "json"},
            OPENAI_API_KEY=SECRETS[2],
        )
        logging.getLogger("some.library").warning(
            "connecting to redis://:%s@cache:6379/0 with api_key=%s", SECRETS[0], SECRETS[2]
        )
        logging.getLogger("celery.worker").info(
            "request headers: Authorization: Basic %s", SECRETS[3]
        )
        try:
            raise RuntimeError(f"login failed for password={SECRETS[0]}")
        except RuntimeError:
            logging.getLogger("some.library").exception("boom")
    finally:
        _restore_root()
    text = stream.getvalue()
    for secret in (*SECRETS, "4111"):
        assert secret not in text, (secret, text)
    records = lines(stream)
    first = records[0]
    assert first["event"] == "enqueue"
    assert first["password"] == REDACTED
    assert first["OPENAI_API_KEY"] == REDACTED
    assert first["headers"] == {"Authorization": REDACTED, "Accept": "json"}
    assert first["payload"]["ssn"] == REDACTED
    assert first["payload"]["to"] == "a@example.com"  # not a secret: kept
    assert first["payload"]["nested"] == [{"card_number": REDACTED}]
    assert "redis://:[REDACTED]@cache:6379/0" in records[1]["event"]
    assert records[1]["level"] == "warning" and records[1]["logger"] == "some.library"
    assert records[2]["logger"] == "celery.worker"
    assert "exception" in records[3] and "RuntimeError" in records[3]["exception"]


def test_redact_is_usable_on_its_own() -> None:
    out = redact({"user": "u", "Proxy-Authorization": "x", "note": "token: abcdefgh1234"})
    assert out == {"user": "u", "Proxy-Authorization": REDACTED, "note": f"token: {REDACTED}"}


def test_log_level_is_honoured_and_wins_over_the_cli_level() -> None:
    stream = io.StringIO()
    settings = Settings(log_level="WARNING")  # as if LOG_LEVEL=WARNING
    try:
        assert configure_logging(settings, level="DEBUG", stream=stream, json_lines=True) == 30
        logging.getLogger("celery").info("hidden")
        logging.getLogger("celery").warning("shown")
    finally:
        _restore_root()
    assert [r["event"] for r in lines(stream)] == ["shown"]
    # without LOG_LEVEL in the environment, Celery's -l decides
    assert configure_logging(Settings(), level="DEBUG", stream=io.StringIO()) == 10
    _restore_root()


def test_a_real_worker_logs_json_lines_per_job_start_and_end_redacted(
    rclient: Any, start_worker: Any
) -> None:
    import tests.ops_tasks  # noqa: F401 - registers the task for enqueue

    worker = start_worker(
        "ops-logs",
        env={
            "SYNTH_INCLUDE": "tests.e2e_tasks,tests.ops_tasks",
            "SYNTH_REDACT_FIELDS": "ssn",
            "LOG_LEVEL": "INFO",
        },
    )
    handle = enqueue(
        "tests.ops_tasks.log_secrets",
        {"user": "ann", "password": SECRETS[0], "ssn": SECRETS[1], "api_key": SECRETS[2]},
        queue="ops-logs",
    )
    assert handle.wait(timeout=30) == "ann"

    def finished() -> bool:
        return '"job finished"' in worker.output()

    assert wait_until(finished, timeout=10), worker.output()
    text = worker.output()
    for secret in SECRETS:
        assert secret not in text
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    assert records, text
    # everything the worker wrote after start-up is JSON: Celery's own lines included
    assert any(r.get("logger", "").startswith("celery") for r in records)
    mine = [r for r in records if r.get("job_id") == handle.id]
    start = next(r for r in mine if r["event"] == "job started")
    end = next(r for r in mine if r["event"] == "job finished")
    assert start["task"] == end["task"] == "tests.ops_tasks.log_secrets"
    assert start["queue"] == end["queue"] == "ops-logs"
    assert start["attempt"] == end["attempt"] == 1
    assert end["outcome"] == "succeeded"
    assert end["duration"] >= 0
    # the task's own lines carry the job id (bound in context) and are redacted
    processing = next(r for r in records if r["event"] == "processing")
    assert processing["job_id"] == handle.id
    assert processing["payload"] == {"user": "ann", "password": REDACTED, "ssn": REDACTED}
    assert processing["api_key"] == REDACTED
