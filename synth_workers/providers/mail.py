"""Mail backends: SendGrid (official ``sendgrid`` SDK, v3 mail send), file (.eml files in an
outbox folder) and console. ``SYNTH_MAIL_BACKEND`` picks one; unset, SendGrid is used when
``SENDGRID_API_KEY`` is set and the file backend otherwise.

SendGrid failures map to the platform's errors: 429 → :class:`RateLimitedError` and 5xx,
connection errors, timeouts → :class:`ProviderUnavailableError` (both retried, honouring
``Retry-After``); 400/401/403 and other 4xx → :class:`ProviderRejectedError` (dead-letter,
with SendGrid's own error text).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import make_msgid
from typing import Any

from python_http_client.exceptions import HTTPError
from sendgrid import SendGridAPIClient
from sendgrid.helpers.mail import Category, CustomArg, Mail, ReplyTo

from synth_workers.errors import (
    ConfigurationError,
    ProviderRejectedError,
    ProviderUnavailableError,
    RateLimitedError,
)
from synth_workers.settings import Settings


@dataclass(frozen=True)
class OutgoingMail:
    """A rendered message, ready for any backend."""

    to: list[str]
    sender: str
    subject: str
    text: str
    html: str
    reply_to: str | None = None
    categories: list[str] = field(default_factory=list)
    #: The job that sends it (SendGrid custom arg, .eml file name).
    job_id: str = "direct"

    def as_email_message(self) -> EmailMessage:
        message = EmailMessage()
        message["Subject"] = self.subject
        message["From"] = self.sender
        message["To"] = ", ".join(self.to)
        message["Message-ID"] = make_msgid(domain="synth-workers.local")
        if self.reply_to:
            message["Reply-To"] = self.reply_to
        if self.categories:
            message["X-Categories"] = ", ".join(self.categories)
        message.set_content(self.text)
        message.add_alternative(self.html, subtype="html")
        return message


def deliver(mail: OutgoingMail, settings: Settings) -> dict[str, Any]:
    """Send ``mail`` through the configured backend; returns what happened (JSON-able)."""
    backend = settings.mail_transport
    if backend == "sendgrid":
        return send_sendgrid(mail, settings)
    if backend == "console":
        sys.stdout.write(mail.as_email_message().as_string() + "\n")
        return {"backend": "console", "recipients": len(mail.to)}
    return write_eml(mail, settings)


def write_eml(mail: OutgoingMail, settings: Settings) -> dict[str, Any]:
    """The file backend: ``<outbox>/<job id>.eml`` (a second run rewrites the same file)."""
    outbox = settings.mail_outbox
    outbox.mkdir(parents=True, exist_ok=True)
    path = outbox / f"{mail.job_id}.eml"
    tmp = path.with_suffix(".eml.tmp")
    tmp.write_bytes(bytes(mail.as_email_message()))
    tmp.replace(path)
    return {"backend": "file", "path": str(path.resolve()), "recipients": len(mail.to)}


def sendgrid_body(mail: OutgoingMail) -> dict[str, Any]:
    """The v3 mail-send request body, built with the SDK's helpers (one personalization per
    recipient: recipients do not see each other)."""
    message = Mail(
        from_email=mail.sender,
        to_emails=list(mail.to),
        subject=mail.subject,
        plain_text_content=mail.text,
        html_content=mail.html,
        is_multiple=len(mail.to) > 1,
    )
    if mail.reply_to:
        message.reply_to = ReplyTo(mail.reply_to)
    if mail.categories:
        message.category = [Category(c) for c in mail.categories]
    message.custom_arg = CustomArg("synth_job_id", mail.job_id)
    body: dict[str, Any] = message.get()
    return body


def send_sendgrid(mail: OutgoingMail, settings: Settings) -> dict[str, Any]:
    key = settings.sendgrid_api_key
    if key is None:
        raise ConfigurationError("SYNTH_MAIL_BACKEND=sendgrid needs SENDGRID_API_KEY")
    client = SendGridAPIClient(key.get_secret_value(), host=settings.sendgrid_api_host)
    client.client.timeout = settings.sendgrid_timeout
    try:
        response = client.send(sendgrid_body(mail))
    except HTTPError as exc:  # the SDK's: any status >= 400
        raise _mapped(int(exc.status_code), exc.body, exc.headers) from exc
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise ProviderUnavailableError(f"SendGrid unreachable: {exc}") from exc
    headers = _headers(response.headers)
    return {
        "backend": "sendgrid",
        "status": int(response.status_code),
        "message_id": headers.get("x-message-id"),
        "recipients": len(mail.to),
    }


def _headers(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    items = raw.items() if hasattr(raw, "items") else raw
    return {str(k).lower(): str(v) for k, v in items}


def provider_text(body: Any) -> str:
    """SendGrid's error messages (``{"errors": [{"message": ..., "field": ...}]}``)."""
    raw = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    try:
        data = json.loads(raw)
    except ValueError:
        return raw[:2000]
    errors = data.get("errors") if isinstance(data, dict) else None
    if not isinstance(errors, list):
        return raw[:2000]
    parts = []
    for e in errors:
        if isinstance(e, dict):
            where = f" (field {e['field']})" if e.get("field") else ""
            parts.append(f"{e.get('message', '')}{where}")
    return "; ".join(parts) or raw[:2000]


def retry_after(headers: dict[str, str], now: float | None = None) -> float | None:
    """Seconds to wait: ``Retry-After`` (seconds), else SendGrid's ``X-RateLimit-Reset``."""
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
    reset = headers.get("x-ratelimit-reset")
    if reset:
        try:
            return max(0.0, float(reset) - (time.time() if now is None else now))
        except ValueError:
            pass
    return None


def _mapped(status: int, body: Any, raw_headers: Any) -> Exception:
    headers = _headers(raw_headers)
    text = provider_text(body)
    wait = retry_after(headers)
    if status == 429:
        return RateLimitedError(f"SendGrid 429: {text}", retry_after=wait)
    if status >= 500 or status in (408, 409):
        return ProviderUnavailableError(f"SendGrid {status}: {text}", status, wait)
    return ProviderRejectedError(f"SendGrid {status}: {text}", status)
