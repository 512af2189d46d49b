"""Email: templates, the SendGrid SDK against a loopback SendGrid, error mapping, the effect
guard and the shared send-rate limit, with real worker processes, Redis and Postgres."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from synth_workers import JobFailedError, JobState, PermanentError, app, enqueue, load_settings
from synth_workers.providers.mail import OutgoingMail, sendgrid_body
from tasks.email import EmailPayload, build, render, templates

from .conftest import wait_until
from .fake_providers import SENDGRID, FakeProviders, Reply

CONTEXTS: dict[str, dict[str, Any]] = {
    "welcome": {"name": "Ada"},
    "password_reset": {"name": "Ada", "reset_url": "https://example.com/reset?t=abc"},
    "workflow_completed": {
        "workflow_id": "wf-1",
        "documents": 3,
        "provider": "openai",
        "model": "gpt-test",
        "input_tokens": 10,
        "output_tokens": 5,
        "credits": 0.015,
        "result": "all good",
    },
    "dlq_digest": {
        "day": "2026-11-27",
        "total": 2,
        "rows": [{"count": 2, "task": "t", "failure_class": "exception", "last": "x"}],
    },
}


@pytest.fixture
def sendgrid() -> Iterator[FakeProviders]:
    server = FakeProviders()
    yield server
    server.close()


def _env(server: FakeProviders, **extra: str) -> dict[str, str]:
    return {
        "SENDGRID_API_KEY": "SG.test-key",
        "SENDGRID_API_HOST": server.url,
        "SYNTH_MAIL_BACKEND": "sendgrid",
        **extra,
    }


def _mail(to: Any = "user@example.com", **kw: Any) -> dict[str, Any]:
    return {"to": to, "template": "welcome", "context": {"name": "Ada"}, **kw}


# --- rendering (no worker) ----------------------------------------------------------------


def test_every_template_renders_with_css_inlined() -> None:
    assert {"welcome", "password_reset", "workflow_completed", "dlq_digest"} <= set(templates())
    for name in templates():
        out = render(name, CONTEXTS[name])
        assert out.subject and "\n" not in out.subject
        assert "SynthStack" in out.subject + out.text
        assert "<style" not in out.html  # inlined, then dropped
        assert 'style="' in out.html
        assert "font-family" in out.html
    reset = render("password_reset", CONTEXTS["password_reset"])
    assert "https://example.com/reset?t=abc" in reset.text
    assert 'href="https://example.com/reset?t=abc"' in reset.html


def test_strict_undefined_and_autoescape() -> None:
    with pytest.raises(PermanentError, match="reset_url"):
        render("password_reset", {"name": "Ada"})
    out = render("welcome", {"name": "<script>x</script>"})
    assert "<script>" not in out.html and "&lt;script&gt;" in out.html
    assert "<script>x</script>" in out.text  # the plain-text part is not HTML


def test_sendgrid_body_is_built_with_the_sdk() -> None:
    payload = EmailPayload.model_validate(
        _mail(["a@example.com", "b@example.com"], reply_to="r@example.com", categories=["c1"])
    )
    mail = build(payload, load_settings(), "job-1")
    body = sendgrid_body(mail)
    assert sorted(p["to"][0]["email"] for p in body["personalizations"]) == [
        "a@example.com",
        "b@example.com",
    ]
    assert body["reply_to"] == {"email": "r@example.com"}
    assert body["custom_args"] == {"synth_job_id": "job-1"}
    assert isinstance(mail, OutgoingMail)


# --- end to end with real workers ---------------------------------------------------------


def test_sendgrid_happy_path_through_the_sdk(
    rclient: Any, start_worker: Any, sendgrid: FakeProviders
) -> None:
    start_worker("email", env=_env(sendgrid))
    h = enqueue(
        "tasks.email.send_email",
        _mail(
            ["a@example.com", "b@example.com"],
            **{"from": "sender@example.com"},
            reply_to="help@example.com",
            categories=["onboarding"],
        ),
    )
    result = h.wait(timeout=30)
    assert result["backend"] == "sendgrid" and result["status"] == 202
    assert result["message_id"]
    [req] = sendgrid.requests(SENDGRID)
    assert req.headers["authorization"] == "Bearer SG.test-key"
    assert req.headers["user-agent"].startswith("sendgrid/")
    body = req.body
    assert body["from"] == {"email": "sender@example.com"}
    assert body["subject"] == "Welcome to SynthStack"
    assert sorted(p["to"][0]["email"] for p in body["personalizations"]) == [
        "a@example.com",
        "b@example.com",
    ]
    content = {c["type"]: c["value"] for c in body["content"]}
    assert "Hello Ada" in content["text/plain"]
    assert 'style="' in content["text/html"] and "<style" not in content["text/html"]
    assert body["reply_to"] == {"email": "help@example.com"}
    assert body["categories"] == ["onboarding"]
    assert body["custom_args"] == {"synth_job_id": h.id}


def test_429_waits_for_retry_after_and_is_delivered_once(
    rclient: Any, start_worker: Any, sendgrid: FakeProviders
) -> None:
    sendgrid.script(SENDGRID, Reply(429, "too many requests", headers={"Retry-After": "2"}))
    start_worker("email", env=_env(sendgrid))
    h = enqueue("tasks.email.send_email", _mail())
    assert h.wait(timeout=30)["status"] == 202
    first, second = sendgrid.requests(SENDGRID)
    assert second.at - first.at >= 1.9  # Retry-After honoured (not the 0.5 s backoff)
    assert h.info()["attempt"] == 2


def test_5xx_is_retried(rclient: Any, start_worker: Any, sendgrid: FakeProviders) -> None:
    sendgrid.script(SENDGRID, Reply(503, "unavailable"), Reply(500, "oops"))
    start_worker("email", env=_env(sendgrid))
    h = enqueue("tasks.email.send_email", _mail())
    assert h.wait(timeout=30)["status"] == 202
    assert len(sendgrid.requests(SENDGRID)) == 3
    assert h.info()["attempt"] == 3


@pytest.mark.parametrize("status", [400, 401, 403])
def test_4xx_is_dead_lettered_with_the_provider_text(
    rclient: Any, start_worker: Any, sendgrid: FakeProviders, status: int
) -> None:
    text = "The from address does not match a verified Sender Identity"
    sendgrid.script(SENDGRID, Reply(status, text))
    start_worker("email", env=_env(sendgrid))
    h = enqueue("tasks.email.send_email", _mail())
    with pytest.raises(JobFailedError) as caught:
        h.wait(timeout=30)
    assert caught.value.error_class == "ProviderRejectedError"
    assert text in caught.value.error and str(status) in caught.value.error
    assert h.info()["attempt"] == 1
    time.sleep(1.0)
    assert len(sendgrid.requests(SENDGRID)) == 1


def test_missing_template_variable_is_dead_at_once(
    rclient: Any, start_worker: Any, sendgrid: FakeProviders
) -> None:
    start_worker("email", env=_env(sendgrid))
    h = enqueue("tasks.email.send_email", {"to": "a@example.com", "template": "password_reset"})
    with pytest.raises(JobFailedError) as caught:
        h.wait(timeout=30)
    assert caught.value.error_class == "PermanentError"
    assert "reset_url" in caught.value.error
    assert h.info()["attempt"] == 1
    assert sendgrid.requests(SENDGRID) == []


def test_sent_once_when_the_job_runs_twice(
    rclient: Any, start_worker: Any, sendgrid: FakeProviders
) -> None:
    start_worker("email", env=_env(sendgrid))
    h = enqueue("tasks.email.send_email", _mail())
    h.wait(timeout=30)
    # The worker "died" after sending, before its completion was written: the row is still
    # running under a lease that expired. The reaper takes it back and it runs again.
    with app.ledger.connection() as conn:
        conn.execute(
            "UPDATE synth_jobs SET state = 'running', lease_owner = 'gone:1:x', "
            "lease_expires_at = now() - interval '1 minute', finished_at = NULL WHERE id = %s",
            (h.id,),
        )
    assert wait_until(
        lambda: h.info()["attempt"] == 2 and h.state() is JobState.SUCCEEDED, timeout=30
    )
    assert h.info()["result"] == {"already_sent": True, "recipients": 1}
    assert len(sendgrid.requests(SENDGRID)) == 1


def test_shared_rate_limit_across_two_workers(
    rclient: Any, start_worker: Any, sendgrid: FakeProviders
) -> None:
    rate = 4
    env = _env(sendgrid, SYNTH_EMAIL_RATE_PER_SECOND=str(rate))
    start_worker("email", concurrency=2, env=env)
    start_worker("email", concurrency=2, env=env)
    handles = [enqueue("tasks.email.send_email", _mail(f"u{i}@example.com")) for i in range(16)]
    for h in handles:
        h.wait(timeout=60)
    assert len(sendgrid.requests(SENDGRID)) == 16
    peak = sendgrid.max_in_window(SENDGRID, 1.0)
    times = sorted(r.at for r in sendgrid.requests(SENDGRID))
    print(f"email rate limit {rate}/s: max {peak} in any 1 s; span {times[-1] - times[0]:.2f}s")
    assert peak <= rate
    assert times[-1] - times[0] >= (16 / rate) - 1.0 - 0.1
    assert all(h.info()["attempt"] == 1 for h in handles)  # waiting used no attempt
