"""Structured logs: structlog JSON lines (a console renderer on a terminal), secrets redacted.

- :func:`configure_logging` puts one structlog formatter on the root logger, so Celery's
  logs, the libraries' and ours come out the same way. Workers and beat call it through
  Celery's ``setup_logging`` signal (connected by the app factory), which also stops Celery
  from installing its own handlers. ``LOG_LEVEL`` wins when set; otherwise ``-l`` does.
- :func:`log_job_event` (a lifecycle listener) writes one line when a job starts and one when
  an attempt ends, with job id, task, queue, attempt, duration and outcome.
- :func:`bind_job` / :func:`unbind_job` (``task_prerun`` / ``task_postrun``) bind the running
  job's id, task and request id (``correlation_id``) to every line the task logs; the per-job
  lines carry the request id too.
- :func:`redact` replaces the values of passwords, API keys, tokens, authorization headers,
  cookies, DSNs and the keys listed in ``SYNTH_REDACT_FIELDS`` — at any depth — with
  ``[REDACTED]``, and scrubs URL passwords, bearer tokens and ``key=value`` secrets inside
  messages and tracebacks.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Mapping
from typing import IO, TYPE_CHECKING, Any

import structlog
from structlog.types import EventDict, Processor, WrappedLogger

from synth_workers.correlation import of_request
from synth_workers.lifecycle import JobEvent

if TYPE_CHECKING:
    from synth_workers.settings import Settings

REDACTED = "[REDACTED]"
#: A key is secret when its normalised name contains one of these.
SECRET_KEY_PARTS = (
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "cookie",
    "credential",
    "private_key",
    "access_key",
    "session_key",
)
SECRET_KEYS = frozenset({"pwd", "dsn", "auth", "sentry_dsn", "x_api_key", "api-key"})
#: Names of secrets (a regex of key names), not a secret.
_SECRET_WORDS = (
    r"[\w-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key|authorization|cookie)"  # noqa: S105
    r"[\w-]*|pwd|dsn"
)
_FIXED_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/\s@]*:)[^@\s/]+(@)", re.I), rf"\1{REDACTED}\2"),
    # Authorization: Bearer abc (a header line)
    (
        re.compile(
            r"\b((?:proxy-)?authorization\s*:\s*)(?:(?:bearer|basic|token|digest)\s+)?"
            r"[^\s\"',;}]+",
            re.I,
        ),
        rf"\1{REDACTED}",
    ),
    (re.compile(r"\b(bearer\s+)[A-Za-z0-9._~+/=-]{8,}", re.I), rf"\1{REDACTED}"),
    # provider keys that appear bare (OpenAI/Anthropic style)
    (re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"), REDACTED),
)


def _key_patterns(words: str) -> tuple[tuple[re.Pattern[str], str], ...]:
    """``'key': 'value'`` / ``"key": "value"`` (reprs, JSON: a key opens the text, a line or
    follows ``{`` or ``,``) and ``key=value`` in text. Only values go: a quoted name inside a
    sentence (``template 'password_reset': 'reset_url' is undefined``) stays as it is."""
    return (
        (
            re.compile(
                rf"((?:^|[{{,])\s*)([\"'])((?:{words}))\2(\s*:\s*)([\"'])(?:(?!\5).)*\5",
                re.I | re.M,
            ),
            rf"\1\2\3\2\4\5{REDACTED}\5",
        ),
        (
            re.compile(rf"\b((?:{words})\s*[:=]\s*)(?![\"'\[{{(])[^\s\"',;&}}]+", re.I),
            rf"\1{REDACTED}",
        ),
    )


def _norm(key: str) -> str:
    return key.strip().lower().replace("-", "_")


class Redactor:
    """The redaction processor; ``fields`` are extra keys (``SYNTH_REDACT_FIELDS``)."""

    def __init__(self, fields: Iterable[str] = ()) -> None:
        self.fields = frozenset(_norm(f) for f in fields if f.strip())
        words = _SECRET_WORDS + "".join(
            "|" + re.escape(f).replace("_", "[_-]") for f in sorted(self.fields)
        )
        self.patterns = (*_FIXED_PATTERNS, *_key_patterns(words))

    def secret_key(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        name = _norm(key)
        return (
            name in self.fields
            or name in SECRET_KEYS
            or any(part in name for part in SECRET_KEY_PARTS)
        )

    def scrub(self, text: str) -> str:
        for pattern, replacement in self.patterns:
            text = pattern.sub(replacement, text)
        return text

    def value(self, value: Any, depth: int = 0) -> Any:
        if depth > 32:
            return value
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, Mapping):
            return {
                k: REDACTED if self.secret_key(k) else self.value(v, depth + 1)
                for k, v in value.items()
            }
        if isinstance(value, (list, tuple)):
            return type(value)(self.value(v, depth + 1) for v in value)
        return value

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        for key in list(event_dict):
            if key.startswith("_"):
                continue
            event_dict[key] = REDACTED if self.secret_key(key) else self.value(event_dict[key])
        return event_dict


def redact(event: Mapping[str, Any], fields: Iterable[str] = ()) -> dict[str, Any]:
    """``event`` with its secrets replaced (what every log line goes through)."""
    return dict(Redactor(fields)(None, "info", dict(event)))


def _level(settings: Settings, cli_level: int | str | None) -> int:
    if "log_level" in settings.model_fields_set or cli_level is None:
        return logging.getLevelName(settings.log_level)  # type: ignore[no-any-return]
    if isinstance(cli_level, int):
        return cli_level
    return logging.getLevelName(str(cli_level).upper())  # type: ignore[no-any-return]


def configure_logging(
    settings: Settings,
    level: int | str | None = None,
    stream: IO[str] | None = None,
    json_lines: bool | None = None,
) -> int:
    """Route every log record through one structlog formatter on the root logger.

    JSON lines unless ``stream`` is a terminal (then the console renderer); ``json_lines``
    forces either. Returns the level set.
    """
    stream = stream or sys.stderr
    if json_lines is None:
        json_lines = not (hasattr(stream, "isatty") and stream.isatty())
    redactor = Redactor(settings.redact_fields)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.ExtraAdder(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if json_lines:
        shared.append(structlog.processors.format_exc_info)
    shared.append(redactor)
    renderer: Processor = (
        structlog.processors.JSONRenderer()
        if json_lines
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    handler.set_name("synth-workers")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    numeric = _level(settings, level)
    root.setLevel(numeric)
    for name in ("celery", "kombu", "amqp", "redis", "psycopg", "billiard"):
        child = logging.getLogger(name)
        child.handlers.clear()
        child.propagate = True
    return numeric


def on_setup_logging(app: Any) -> Any:
    """A ``setup_logging`` receiver for ``app`` (Celery then installs no handler itself)."""

    def receiver(
        loglevel: int | str | None = None, logfile: str | None = None, **kwargs: Any
    ) -> None:
        stream = open(logfile, "a", buffering=1) if logfile else None  # noqa: SIM115
        configure_logging(app.settings, level=loglevel, stream=stream)

    return receiver


# --- per-job lines ---------------------------------------------------------------------------

jobs_log = logging.getLogger("synth_workers.jobs")
_END_KINDS = {"succeeded": logging.INFO, "retrying": logging.WARNING, "dead": logging.ERROR,
              "cancelled": logging.INFO}  # fmt: skip


def log_job_event(event: JobEvent) -> None:
    """Lifecycle listener: one line per job start and per attempt's end."""
    kind = event.kind
    if kind == "started":
        level = logging.INFO
        message = "job started"
    elif kind in _END_KINDS:
        if event.data.get("failure_class") == "rejected_message":
            return  # one line per batch instead (synth_workers.ledger.refusals): a flood of
            # bad messages must not become a flood of log lines
        level = _END_KINDS[kind]
        message = "job finished"
    else:
        return
    if not jobs_log.isEnabledFor(level):
        return
    data = event.data
    extra: dict[str, Any] = {
        "job_id": event.job_id,
        "task": event.task,
        "queue": event.queue,
        "attempt": event.attempt,
        # always given: a success may be logged while the next job's context is bound
        "correlation_id": event.correlation_id,
    }
    if kind == "started":
        extra["queue_wait"] = data.get("queue_wait")
    else:
        extra["outcome"] = kind
        extra["duration"] = data.get("runtime")
        for key in ("failure_class", "error_class", "delay"):
            if data.get(key) is not None:
                extra[key] = data[key]
    jobs_log.log(level, message, extra=extra)


def bind_job(task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    """``task_prerun``: the job's id, task and request id (``correlation_id``, when it
    carries one) on every line the task logs."""
    fields: dict[str, Any] = {"job_id": task_id, "task": getattr(task, "name", None)}
    correlation_id = of_request(getattr(task, "request", None))
    if correlation_id is not None:
        fields["correlation_id"] = correlation_id
    structlog.contextvars.bind_contextvars(**fields)


def unbind_job(**kwargs: Any) -> None:
    """``task_postrun``."""
    structlog.contextvars.unbind_contextvars("job_id", "task", "correlation_id")
