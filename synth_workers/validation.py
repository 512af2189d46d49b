"""What a job may carry into the ledger: checked at send time, before anything is written.

Every send goes through :meth:`synth_workers.task.Task.apply_async` (``enqueue``, Celery's
``delay``/``apply_async``, canvas callbacks), which calls these checks first; a refusal is a
:class:`~synth_workers.errors.PayloadValidationError` and nothing reaches Postgres or Redis.

- **Payload** (keyword and positional arguments): strict JSON. No NaN or Infinity (not JSON;
  Postgres ``jsonb`` refuses them), no string (dict keys included) holding a NUL or a lone
  surrogate (``jsonb`` refuses both). The payload is serialized once, by the C encoder, and
  the byte count it gives is the size ``SYNTH_MAX_PAYLOAD_BYTES`` caps; the slower walk that
  names the offending value (``payload['a'][2]``) runs only when the encoder refused, or when
  its ASCII output holds ``\\u0000`` or ``\\ud`` (a NUL, or a surrogate: a lone one, or half
  of a pair, which is why the walk decides).
- **Idempotency key**: a ``str`` of 1 to 255 printable characters.
- **Delay** (``delay=``, ``countdown=``, ``eta=``): finite, ``>= 0`` and at most
  ``SYNTH_MAX_DELAY_SECONDS``. An ``eta`` in the past means now (as in Celery).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from kombu.utils import json as kombu_json

from synth_workers.errors import PayloadValidationError

#: The longest idempotency key, in characters.
MAX_KEY_LENGTH = 255

# One encoder, built once (json.dumps with options builds a new one per call).
#: Celery's ``json`` serializer (kombu's): strict JSON plus the types kombu carries (bytes,
#: datetime, date, time, UUID, Decimal), as the ledger stores them (``arguments_json``).
_encode = kombu_json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode


def payload_size(args: Sequence[Any] | None, kwargs: Mapping[str, Any] | None) -> int:
    """Bytes of the JSON of ``kwargs`` (plus ``args`` when given); refuse what is not strict
    JSON with a :class:`PayloadValidationError` naming the offending value's path."""
    size = _checked_size(kwargs or {}, "payload")
    if args:
        size += _checked_size(args, "args")
    return size


def _checked_size(value: Any, root: str) -> int:
    try:
        text = _encode(value)
    except RecursionError:
        raise PayloadValidationError(f"{root} is nested too deeply") from None
    except (TypeError, ValueError) as exc:
        found = _find_problem(value, root)
        raise PayloadValidationError(found or f"{root} is not JSON: {exc}") from None
    if "\\u0000" in text or "\\ud" in text:  # a NUL or a surrogate may be there: look
        found = _find_problem(value, root)
        if found:
            raise PayloadValidationError(found)
    return len(text)  # ASCII (ensure_ascii): characters are bytes


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which Postgres cannot store"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone surrogate (not valid Unicode), which Postgres cannot store"
    return None


def _label(key: Any) -> str:
    shown = repr(key)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _find_problem(value: Any, path: str, depth: int = 0) -> str | None:
    """The first value under ``value`` that strict JSON refuses, as ``"<path> <why>"``."""
    if depth > 500:
        return f"{path} is nested too deeply"
    if isinstance(value, str):
        why = _string_problem(value)
        return f"{path} {why}" if why else None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is {value!r}: JSON has no NaN or Infinity"
    if value is None or isinstance(value, int):
        return None
    if isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str):
                why = _string_problem(key)
                if why:
                    return f"{path} has a key {_label(key)} that {why}"
            elif isinstance(key, float) and not math.isfinite(key):
                return f"{path} has a key {key!r}: JSON has no NaN or Infinity"
            elif not (key is None or isinstance(key, (int, float))):
                return f"{path} has a key of type {type(key).__name__} (JSON keys are strings)"
            found = _find_problem(item, f"{path}[{_label(key)}]", depth + 1)
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = _find_problem(item, f"{path}[{index}]", depth + 1)
            if found:
                return found
        return None
    return f"{path} is a {type(value).__name__}, which is not JSON"


def check_idempotency_key(key: Any) -> str:
    """The key, if it is a ``str`` of 1 to 255 printable characters."""
    if not isinstance(key, str):
        raise PayloadValidationError(f"idempotency key must be a str, got {type(key).__name__}")
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise PayloadValidationError(
            f"idempotency key must be 1 to {MAX_KEY_LENGTH} characters, got {len(key)}"
        )
    if not key.isprintable():
        raise PayloadValidationError(
            "idempotency key must hold printable characters only (no control characters, "
            "line breaks, NUL or lone surrogates)"
        )
    return key


def check_delay(seconds: Any, limit: float) -> float:
    """``seconds`` as a float, if it is a finite number in ``[0, limit]``."""
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        raise PayloadValidationError(
            f"delay (delay=, countdown=) must be a number of seconds, got {type(seconds).__name__}"
        )
    value = float(seconds)
    if not math.isfinite(value) or value < 0 or value > limit:
        raise PayloadValidationError(
            f"delay must be finite, >= 0 and at most {limit:g} seconds "
            f"(SYNTH_MAX_DELAY_SECONDS), got {seconds!r}"
        )
    return value


def eta_delay(eta: Any, limit: float) -> float:
    """Seconds until ``eta`` (a datetime or an ISO 8601 string; a past one is 0)."""
    if isinstance(eta, str):
        try:
            eta = datetime.fromisoformat(eta)
        except ValueError:
            raise PayloadValidationError(f"eta is not an ISO 8601 date and time: {eta!r}") from None
    if not isinstance(eta, datetime):
        raise PayloadValidationError(
            f"eta must be a datetime or an ISO 8601 string, got {type(eta).__name__}"
        )
    return check_delay(max(0.0, eta.timestamp() - time.time()), limit)


def expires_at(expires: Any) -> datetime | None:
    """Celery's ``expires=`` (seconds from now, a datetime, or an ISO 8601 string) as the
    moment the ledger stores; a naive datetime is UTC (the app's timezone)."""
    if expires is None:
        return None
    if isinstance(expires, str):
        try:
            expires = datetime.fromisoformat(expires)
        except ValueError:
            raise PayloadValidationError(
                f"expires is not an ISO 8601 date and time: {expires!r}"
            ) from None
    if isinstance(expires, datetime):
        return expires if expires.tzinfo else expires.replace(tzinfo=UTC)
    if isinstance(expires, bool) or not isinstance(expires, (int, float)):
        raise PayloadValidationError(
            f"expires must be seconds, a datetime or an ISO 8601 string, got "
            f"{type(expires).__name__}"
        )
    if not math.isfinite(expires):
        raise PayloadValidationError(f"expires must be a finite number of seconds: {expires!r}")
    return datetime.now(UTC) + timedelta(seconds=max(-1e9, min(float(expires), 1e9)))
