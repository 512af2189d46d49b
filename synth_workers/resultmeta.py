"""A job's ledger row as the result meta Celery's Redis backend would have stored."""

from __future__ import annotations

import builtins
from typing import Any

from celery import states

#: Ledger state → Celery state.
CELERY_STATES = {
    "scheduled": states.PENDING,
    "queued": states.PENDING,
    "running": states.STARTED,
    "failed-retrying": states.RETRY,
    "succeeded": states.SUCCESS,
    "dead": states.FAILURE,
    "cancelled": states.REVOKED,
}
#: Final lifecycle announcements → the Celery state a waiter is told.
FINAL_ANNOUNCEMENTS = {
    "succeeded": states.SUCCESS,
    "dead": states.FAILURE,
    "cancelled": states.REVOKED,
}
#: Modules of the exceptions the platform itself records by class name only.
_KNOWN_MODULES = {
    "WorkerLostError": "billiard.exceptions",
    "TimeLimitExceeded": "billiard.exceptions",
    "SoftTimeLimitExceeded": "billiard.exceptions",
}


def _exception_module(row: dict[str, Any]) -> str | None:
    module = row.get("error_module")
    name = row.get("error_class") or "Exception"
    if module:
        return str(module)
    if name in _KNOWN_MODULES:
        return _KNOWN_MODULES[name]
    if isinstance(getattr(builtins, name, None), type):
        return "builtins"
    return None  # Celery makes a class of that name (create_exception_cls)


def stored_meta(row: dict[str, Any]) -> dict[str, Any]:
    """A ledger row as the meta Celery's Redis backend would have stored (JSON-able; an
    exception as Celery's ``prepare_exception`` dict)."""
    status = CELERY_STATES.get(row["state"], states.PENDING)
    result: Any = None
    traceback = None
    if status == states.SUCCESS:
        result = row["result"]
    elif status in (states.FAILURE, states.RETRY):
        args = row.get("error_args")
        result = {
            "exc_type": row.get("error_class") or "Exception",
            "exc_message": args if isinstance(args, list) else [row.get("last_error") or ""],
            "exc_module": _exception_module(row),
        }
        traceback = row.get("traceback") if status == states.FAILURE else None
    elif status == states.REVOKED:
        result = {
            "exc_type": "TaskRevokedError",
            "exc_message": [row.get("last_error") or "revoked"],
            "exc_module": "celery.exceptions",
        }
    elif status == states.STARTED:
        host, _, rest = str(row.get("lease_owner") or "").partition(":")
        pid = rest.partition(":")[0]
        result = {"hostname": host, "pid": int(pid) if pid.isdigit() else None}
    finished = row.get("finished_at")
    return {
        "task_id": str(row["id"]),
        "status": status,
        "result": result,
        "traceback": traceback,
        "children": [],
        "date_done": finished.isoformat() if finished is not None else None,
        "name": row.get("task"),
        "args": row.get("args") or [],
        "kwargs": row.get("payload") or {},
        "queue": row.get("queue"),
        "retries": max(0, int(row.get("attempt") or 0) - 1),
    }
