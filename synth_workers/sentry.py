"""Sentry error reporting, only when ``SENTRY_DSN`` is set (extra: ``synth-workers[sentry]``).

sentry-sdk is imported only then. Workers and beat call :func:`init_sentry` at start-up
(``celeryd_init`` / ``beat_init``, receivers of :mod:`synth_workers.install`) with the Celery
integration,
so a failed job is reported with its task name (under ``SENTRY_ENVIRONMENT`` when set) and
a trace is sampled at ``SENTRY_TRACES_SAMPLE_RATE``. Events go through the log redactor
before they leave.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from synth_workers.settings import Settings

log = logging.getLogger(__name__)


def init_sentry(settings: Settings) -> bool:
    """Start Sentry when ``SENTRY_DSN`` is set; ``False`` when it is not (nothing imported)."""
    if settings.sentry_dsn is None or not settings.sentry_dsn.get_secret_value():
        return False
    try:
        import sentry_sdk
        from sentry_sdk.integrations.celery import CeleryIntegration
    except ImportError:
        log.error("SENTRY_DSN is set but sentry-sdk is not installed: pip install "
                  "'synth-workers[sentry]'")  # fmt: skip
        return False
    from synth_workers.health import version
    from synth_workers.logging import Redactor

    redactor = Redactor(settings.redact_fields)

    def scrub(event: Any, hint: Any) -> Any:
        return redactor.value(event)

    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        traces_sample_rate=settings.sentry_traces_sample_rate,
        integrations=[CeleryIntegration()],
        release=f"synth-workers@{version()}",
        environment=settings.sentry_environment,  # SENTRY_ENVIRONMENT; None: sdk's default
        send_default_pii=False,
        before_send=scrub,
    )
    return True
