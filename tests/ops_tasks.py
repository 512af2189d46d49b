"""Tasks for the operations tests (loaded with SYNTH_INCLUDE by the workers that need them)."""

from __future__ import annotations

import logging

import structlog

from synth_workers import app

log = logging.getLogger(__name__)


@app.task(name="tests.ops_tasks.log_secrets")
def log_secrets(user: str, password: str, ssn: str, api_key: str) -> str:
    """Log its payload and an authorization header; the logs must show none of the secrets."""
    structlog.get_logger("tests.ops").info(
        "processing", payload={"user": user, "password": password, "ssn": ssn}, api_key=api_key
    )
    log.info("calling upstream with Authorization: Bearer %s", api_key)
    log.warning("db at postgresql://app:%s@db:5432/app", password)
    return user
