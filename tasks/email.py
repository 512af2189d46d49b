"""Email jobs: render a template kept in the repo and hand it to the mail backend.

The task is thin: it parses :class:`EmailPayload` and calls :func:`send_email`, a plain
function testable without Celery. Backends are a setting (``SYNTH_MAIL_BACKEND``): ``file``
writes each message as an ``.eml`` file into ``SYNTH_MAIL_OUTBOX``; ``console`` prints it.
"""

from __future__ import annotations

import sys
from email.message import EmailMessage
from email.utils import make_msgid
from pathlib import Path
from typing import Any

from celery import shared_task
from jinja2 import Environment, FileSystemLoader, StrictUndefined, TemplateNotFound
from jinja2.exceptions import UndefinedError
from pydantic import BaseModel, EmailStr, Field, field_validator

from synth_workers.errors import PermanentError
from synth_workers.producer import JobHandle, enqueue
from synth_workers.routing import Priority
from synth_workers.settings import Settings
from synth_workers.task import Task

TEMPLATES = Path(__file__).parent / "templates" / "email"
PRODUCT = "SynthStack"

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
            known = sorted(p.stem for p in TEMPLATES.glob("*.txt"))
            raise ValueError(f"unknown template {value!r}; known: {', '.join(known)}")
        return value


def render(payload: EmailPayload) -> EmailMessage:
    """Build the message (subject, text and HTML parts); a missing variable is an error."""
    context = {"product": PRODUCT, **payload.context}
    try:
        subject = _text_env.get_template(f"{payload.template}.subject").render(context).strip()
        text = _text_env.get_template(f"{payload.template}.txt").render(context)
        html = _env.get_template(f"{payload.template}.html").render(context)
    except (UndefinedError, TemplateNotFound) as exc:
        raise PermanentError(f"template {payload.template!r}: {exc}") from exc
    message = EmailMessage()
    message["Subject"] = subject
    message["To"] = ", ".join(str(a) for a in payload.to)
    message["Message-ID"] = make_msgid(domain="synth-workers.local")
    if payload.reply_to:
        message["Reply-To"] = str(payload.reply_to)
    if payload.categories:
        message["X-Categories"] = ", ".join(payload.categories)
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message


def send_email(payload: EmailPayload, settings: Settings, job_id: str) -> dict[str, Any]:
    """Render and deliver one message through the configured backend."""
    message = render(payload)
    message["From"] = str(payload.from_ or settings.mail_from)
    if settings.mail_backend == "console":
        sys.stdout.write(message.as_string() + "\n")
        return {"backend": "console", "recipients": len(payload.to)}
    outbox = settings.mail_outbox
    outbox.mkdir(parents=True, exist_ok=True)
    path = outbox / f"{job_id}.eml"
    tmp = path.with_suffix(".eml.tmp")
    tmp.write_bytes(bytes(message))
    tmp.replace(path)  # a job that runs twice rewrites the same file, never a second one
    return {"backend": "file", "path": str(path.resolve()), "recipients": len(payload.to)}


@shared_task(name="tasks.email.send_email", bind=True, payload_model=EmailPayload)
def send_email_task(self: Task, payload: EmailPayload) -> dict[str, Any]:
    return send_email(payload, self.synth_app.settings, self.request.id or "direct")


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
