"""Email jobs: render a template kept in the repo and hand it to the mail backend.

The task is thin: it parses :class:`EmailPayload`, renders it (:func:`render`, plain and
testable without Celery) and calls :func:`synth_workers.providers.mail.deliver`. Backends are
a setting (``SYNTH_MAIL_BACKEND``; SendGrid when ``SENDGRID_API_KEY`` is set, else ``file``:
an ``.eml`` file per message in ``SYNTH_MAIL_OUTBOX``).

- Templates (``templates/email/NAME.subject|.txt|.html``) use StrictUndefined: a missing
  variable is a :class:`PermanentError` (dead-letter, never retried). HTML is autoescaped and
  its CSS inlined (``css-inline``), since mail clients drop ``<style>`` blocks.
- A message is sent once per job even when the job runs twice (effect guard ``"sent"``).
- ``SYNTH_EMAIL_RATE_PER_SECOND`` is one limit shared by every worker (Redis): over it, a job
  waits, or is re-scheduled in the ledger without using an attempt.
- 429 and 5xx retry after the provider's ``Retry-After``; 400/401/403 dead-letter with the
  provider's text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import css_inline
from celery import shared_task
from jinja2 import Environment, FileSystemLoader, StrictUndefined, TemplateNotFound
from jinja2.exceptions import TemplateError, UndefinedError
from pydantic import BaseModel, EmailStr, Field, field_validator

from synth_workers.errors import PermanentError, ProviderUnavailableError, RateLimitedError
from synth_workers.limits import Reservation, SlidingWindow, acquire
from synth_workers.producer import JobHandle, enqueue
from synth_workers.providers.mail import OutgoingMail, deliver
from synth_workers.routing import Priority
from synth_workers.settings import Settings
from synth_workers.task import Task

TEMPLATES = Path(__file__).parent / "templates" / "email"
PRODUCT = "SynthStack"
#: The SendGrid timeout (SYNTH_SENDGRID_TIMEOUT, at most 50 s) stays below this.
SOFT_TIME_LIMIT = 60

_env = Environment(
    loader=FileSystemLoader(TEMPLATES),
    undefined=StrictUndefined,
    autoescape=True,
    keep_trailing_newline=True,
)
_text_env = Environment(
    loader=FileSystemLoader(TEMPLATES),
    undefined=StrictUndefined,
    autoescape=False,  # noqa: S701 - plain-text part and subject
)
_inliner = css_inline.CSSInliner(keep_style_tags=False, load_remote_stylesheets=False)


class EmailPayload(BaseModel):
    """One message to one or more recipients, from a template."""

    to: list[EmailStr] = Field(min_length=1, max_length=1000)
    template: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    context: dict[str, Any] = Field(default_factory=dict)
    from_: EmailStr | None = Field(default=None, alias="from")
    reply_to: EmailStr | None = None
    categories: list[str] = Field(default_factory=list, max_length=10)

    model_config = {"populate_by_name": True}

    @field_validator("to", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("template")
    @classmethod
    def _exists(cls, value: str) -> str:
        if not (TEMPLATES / f"{value}.txt").is_file():
            raise ValueError(f"unknown template {value!r}; known: {', '.join(templates())}")
        return value


def templates() -> list[str]:
    """The template names kept in the repo."""
    return sorted(p.stem for p in TEMPLATES.glob("*.txt"))


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str


def render(template: str, context: dict[str, Any]) -> Rendered:
    """Subject, text and HTML (CSS inlined) of ``template``; a missing variable or a broken
    template is a :class:`PermanentError`."""
    context = {"product": PRODUCT, **context}
    try:
        subject = _text_env.get_template(f"{template}.subject").render(context).strip()
        text = _text_env.get_template(f"{template}.txt").render(context)
        html = _env.get_template(f"{template}.html").render(context)
    except (UndefinedError, TemplateNotFound, TemplateError) as exc:
        raise PermanentError(f"template {template!r}: {exc}") from exc
    return Rendered(" ".join(subject.split()), text, _inliner.inline(html))


def build(payload: EmailPayload, settings: Settings, job_id: str) -> OutgoingMail:
    """The message of ``payload`` for any backend."""
    rendered = render(payload.template, payload.context)
    return OutgoingMail(
        to=[str(a) for a in payload.to],
        sender=str(payload.from_ or settings.mail_from),
        subject=rendered.subject,
        text=rendered.text,
        html=rendered.html,
        reply_to=str(payload.reply_to) if payload.reply_to else None,
        categories=list(payload.categories),
        job_id=job_id,
    )


def send_email(payload: EmailPayload, settings: Settings, job_id: str) -> dict[str, Any]:
    """Render and deliver one message through the configured backend (no limits, no guard)."""
    return deliver(build(payload, settings, job_id), settings)


_limiters: dict[tuple[int, float], SlidingWindow] = {}


def email_limiter(task: Task) -> SlidingWindow | None:
    """The shared send-rate limit (``SYNTH_EMAIL_RATE_PER_SECOND``), or None when unset."""
    settings = task.synth_app.settings
    rate = settings.email_rate_per_second
    if rate is None:
        return None
    limit = max(1, math.ceil(rate))
    key = (id(task.synth_app.redis), rate)
    if key not in _limiters:
        _limiters[key] = SlidingWindow(
            task.synth_app.redis,
            "email",
            limit=limit,
            window=limit / rate,
            hold=settings.sendgrid_timeout + 5,
        )
    return _limiters[key]


@shared_task(
    name="tasks.email.send_email",
    bind=True,
    payload_model=EmailPayload,
    soft_time_limit=SOFT_TIME_LIMIT,
    time_limit=SOFT_TIME_LIMIT + 30,
)
def send_email_task(self: Task, payload: EmailPayload) -> dict[str, Any]:
    settings = self.synth_app.settings
    if self.effect_done("sent"):
        return {"already_sent": True, "recipients": len(payload.to)}
    mail = build(payload, settings, self.request.id or "direct")
    reservation: Reservation | None = None
    limiter = email_limiter(self)
    if limiter is not None:
        try:
            reservation = acquire(limiter, 0, settings.limit_max_inline_wait)
        except RateLimitedError as exc:
            self.defer(exc.retry_after or 1.0, "email_rate_limit", capped=False)
    try:
        result = deliver(mail, settings)
    except (RateLimitedError, ProviderUnavailableError) as exc:
        if exc.retry_after is not None:
            if limiter is not None and isinstance(exc, RateLimitedError):
                limiter.block(exc.retry_after)  # every worker holds off, not only this one
            self.retry(exc=exc, countdown=exc.retry_after)
        raise
    finally:
        if reservation is not None:
            reservation.release()
    self.record_effect("sent", result)
    return result


def enqueue_email(
    payload: EmailPayload | dict[str, Any],
    *,
    priority: Priority | None = None,
    delay: float | None = None,
    idempotency_key: str | None = None,
) -> JobHandle:
    """Typed helper: enqueue one email job."""
    return enqueue(
        "tasks.email.send_email",
        payload,
        priority=priority,
        delay=delay,
        idempotency_key=idempotency_key,
    )
