"""Request tracing: the caller's request id (correlation id) carried by its jobs.

An application's request middleware sets the request's id once::

    from synth_workers.correlation import correlation_id

    with correlation_id(request.headers.get("X-Request-ID") or new_correlation_id()):
        handle(request)        # every enqueue / apply_async in here carries it

(or ``token = set_correlation_id(rid)`` ... ``reset_correlation_id(token)``), or passes it
per job: ``enqueue(..., correlation_id=rid)`` (Celery: ``apply_async(...,
synth_correlation_id=rid)``). The id travels in the message's :data:`HEADER` header, so it
survives every re-publish (retry, delay, reaper, reconciler, DLQ replay: the ledger keeps the
message whole) and is stored in the job's ledger row (``correlation_id``, indexed:
``synth-workers jobs list --correlation-id ID``). In a worker it is this module's current id
while the job runs (set at ``task_prerun``), so every job the job starts (chain steps, a
chord's body, fan-out parts, ``enqueue`` from task code) carries it too; and it is on the
job's events (``correlation_id``), its per-job log lines and every line the task logs.

An id is 1 to 255 printable characters (``PayloadValidationError`` otherwise: a request id
read from an untrusted header should be checked, or replaced by :func:`new_correlation_id`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import Any

from synth_workers.errors import PayloadValidationError

#: The message header that carries the id (a Celery task request attribute of that name).
HEADER = "synth_correlation_id"
#: ``apply_async`` option naming it for one send.
OPTION = "synth_correlation_id"
MAX_LENGTH = 255

_current: ContextVar[str | None] = ContextVar("synth_correlation_id", default=None)


def check_correlation_id(value: Any) -> str:
    """``value``, if it is a ``str`` of 1 to 255 printable characters."""
    if not isinstance(value, str):
        raise PayloadValidationError(f"correlation id must be a str, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_LENGTH:
        raise PayloadValidationError(
            f"correlation id must be 1 to {MAX_LENGTH} characters, got {len(value)}"
        )
    if not value.isprintable():
        raise PayloadValidationError(
            "correlation id must hold printable characters only (no control characters, "
            "line breaks, NUL or lone surrogates)"
        )
    return value


def new_correlation_id() -> str:
    """A fresh id (a UUID4's hex), for a request that came without one."""
    return uuid.uuid4().hex


def current_correlation_id() -> str | None:
    """The id jobs sent from here now carry; ``None`` when none is set."""
    return _current.get()


def set_correlation_id(value: str | None) -> Token[str | None]:
    """Make ``value`` (checked; ``None`` clears it) the current id in this context; returns
    the token that :func:`reset_correlation_id` takes to restore the previous one."""
    return _current.set(None if value is None else check_correlation_id(value))


def reset_correlation_id(token: Token[str | None]) -> None:
    _current.reset(token)


@contextmanager
def correlation_id(value: str | None) -> Iterator[str | None]:
    """Within the block, jobs sent carry ``value``."""
    token = set_correlation_id(value)
    try:
        yield value
    finally:
        _current.reset(token)


def for_send(options: dict[str, Any]) -> str | None:
    """The id a send carries: its ``synth_correlation_id`` option (popped), else a
    :data:`HEADER` in its ``headers`` option, else the current one. Checked; written into
    the ``headers`` option so that the message carries it."""
    value = options.pop(OPTION, None)
    headers = options.get("headers")
    if value is None and isinstance(headers, dict):
        value = headers.get(HEADER)
    if value is None:
        value = _current.get()
    if value is None:
        return None
    check_correlation_id(value)
    options["headers"] = {**(headers if isinstance(headers, dict) else {}), HEADER: value}
    return str(value)


def _valid(value: Any) -> str | None:
    if isinstance(value, str) and 1 <= len(value) <= MAX_LENGTH and value.isprintable():
        return value
    return None


def of_request(request: Any) -> str | None:
    """The id a worker's request (a delivered message) carries; ``None`` when it carries
    none, or one that is not a valid id."""
    return _valid(getattr(request, HEADER, None))


def of_headers(headers: Any) -> str | None:
    """The id a message's headers carry (``None``: none, or not a valid id)."""
    return _valid(headers.get(HEADER)) if isinstance(headers, dict) else None


def enter_job(task: Any) -> None:
    """``task_prerun``: the running job's id becomes the current one (its sends carry it).
    A task run in place (``apply()``, eager mode) without one keeps the caller's."""
    request = task.request
    value = of_request(request)
    if value is None and getattr(request, "is_eager", False):
        return
    request.synth_correlation_token = _current.set(value)


def leave_job(task: Any) -> None:
    """``task_postrun``: back to the id that was current before the job."""
    token = getattr(task.request, "synth_correlation_token", None)
    if token is not None:
        task.request.synth_correlation_token = None
        try:
            _current.reset(token)
        except ValueError:  # set in another context (a thread pool's other thread)
            _current.set(None)
