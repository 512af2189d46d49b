"""Settings (names, errors, secrets) and routing (priority rule, queues) without services."""

from __future__ import annotations

import logging

import pytest

from synth_workers import ConfigurationError, RoutingError, load_settings
from synth_workers.app import celery_config
from synth_workers.routing import (
    PRIORITY_LEVELS,
    QUEUES,
    queue_for_task,
    resolve_priority,
    resolve_queue,
    to_transport,
)


def test_operations_guide_names_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:s3cret@redis.internal:6380/2")
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:pgpass@db/app")
    monkeypatch.setenv("QDRANT_URL", "http://qdrant:6333")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    monkeypatch.setenv("LOG_LEVEL", "debug")
    monkeypatch.setenv("SYNTH_MAX_ATTEMPTS", "5")
    s = load_settings()
    assert s.broker_url == "redis://:s3cret@redis.internal:6380/2"
    assert s.database_url == "postgresql://app:pgpass@db/app"
    assert s.openai_api_key is not None
    assert s.openai_api_key.get_secret_value() == "sk-openai-secret"
    assert s.log_level == "DEBUG"
    assert s.max_attempts == 5
    assert celery_config(s)["broker_url"] == s.broker_url


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("SYNTH_MAX_ATTEMPTS", "lots"),
        ("SYNTH_MAX_ATTEMPTS", "0"),
        ("REDIS_URL", "http://localhost"),
        ("DATABASE_URL", "mysql://x"),
        ("LOG_LEVEL", "LOUD"),
        ("SYNTH_MAX_PAYLOAD_BYTES", "-5"),
    ],
)
def test_wrong_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigurationError) as caught:
        load_settings()
    assert str(caught.value).startswith("invalid configuration: " + var)


def test_secrets_never_in_repr_or_logs(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:s3cret@redis.internal:6380/2")
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:pgpass@db/app")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-secret")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-secret")
    monkeypatch.setenv("SENDGRID_API_KEY", "SG.secret")
    monkeypatch.setenv("SENTRY_DSN", "https://key@sentry.example/1")
    s = load_settings()
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("settings: %r / %s", s, s)
    for text in (repr(s), str(s), caplog.text):
        for secret in (
            "s3cret",
            "pgpass",
            "sk-openai-secret",
            "sk-ant-secret",
            "SG.secret",
            "key@sentry",
        ):
            assert secret not in text
    assert "redis.internal" in repr(s)


def test_priority_rule() -> None:
    assert resolve_priority(None) == PRIORITY_LEVELS["normal"] == 5
    assert resolve_priority("high") > resolve_priority("normal") > resolve_priority("low")
    assert resolve_priority(9) > resolve_priority("high")
    assert [resolve_priority(n) for n in range(10)] == list(range(10))
    # kombu's Redis lists count the other way: our most urgent is its list 0
    assert to_transport(9) == 0 and to_transport(0) == 9
    for bad in (10, -1, "urgent", 2.5, True):
        with pytest.raises(RoutingError):
            resolve_priority(bad)  # type: ignore[arg-type]


def test_routes() -> None:
    assert set(QUEUES) == {"email", "orchestration", "embeddings", "embeddings.gpu", "default"}
    assert queue_for_task("tasks.email.send_email") == "email"
    assert queue_for_task("tasks.orchestration.run_workflow") == "orchestration"
    assert queue_for_task("tasks.embeddings.index") == "embeddings"
    assert queue_for_task("myapp.tasks.anything") == "default"
    assert resolve_queue("tasks.embeddings.index", gpu=True) == "embeddings.gpu"
    assert resolve_queue("tasks.embeddings.index") is None  # the task's own route decides
    with pytest.raises(RoutingError):
        resolve_queue("tasks.email.send_email", gpu=True)


def test_celery_config_is_json_only_and_strict() -> None:
    conf = celery_config(load_settings())
    assert conf["accept_content"] == ["json"]
    assert conf["task_serializer"] == "json"
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["task_acks_late"] is True
    assert conf["broker_transport_options"]["priority_steps"] == list(range(10))
