"""The Celery app: ``create_app(settings)`` and the ``app`` that ``celery -A synth_workers`` finds.

Celery's configuration is derived from :class:`~synth_workers.settings.Settings` here and
nowhere else. The app's Task class is the platform's base Task, so every task registered on
it — ours in ``tasks/`` and a user's own ``@app.task`` — gets the platform's behaviour.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import psycopg
import redis
from celery import Celery, signals

from synth_workers import health, metrics, routing, sentry
from synth_workers import logging as logs
from synth_workers.broker import ON_PURGE
from synth_workers.control import revoked_receiver
from synth_workers.errors import ConfigurationError, ServiceUnavailableError
from synth_workers.ledger import LeaseKeeper, Ledger
from synth_workers.ledger.completer import Completer
from synth_workers.ledger.sweeper import SweeperStep
from synth_workers.lifecycle import Lifecycle
from synth_workers.screening import Limits
from synth_workers.settings import Settings, load_settings

#: Our job kinds; ``SYNTH_INCLUDE`` adds the user's own modules.
TASK_MODULES: tuple[str, ...] = (
    "tasks.email",
    "tasks.system",
    "tasks.orchestration",
    "tasks.embeddings",
)


class SynthCelery(Celery):
    """Celery app carrying the platform's settings and job store."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self._keeper: LeaseKeeper | None = None
        self._completer: Completer | None = None

    @cached_property
    def redis(self) -> redis.Redis:
        """Client for the platform's own reads of the broker (reconciling, depth)."""
        timeout = self.settings.redis_timeout
        return redis.Redis.from_url(
            self.settings.broker_url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            socket_keepalive=True,
        )

    @cached_property
    def ledger(self) -> Ledger:
        return Ledger(self.settings)

    @property
    def lifecycle(self) -> Lifecycle:
        """Where every job state change is announced (events, metrics and logs listen)."""
        return self.ledger.lifecycle

    def close(self) -> None:
        if "ledger" in self.__dict__:
            self.ledger.close()
        super().close()

    @property
    def lease_keeper(self) -> LeaseKeeper:
        """This process's lease keeper (a new one after fork)."""
        keeper = self._keeper
        if keeper is None or keeper.pid != os.getpid() or keeper.stopped:
            keeper = self._keeper = LeaseKeeper(self.ledger, self.settings.lease_seconds)
        return keeper

    @property
    def completer(self) -> Completer:
        """This process's batched-completion writer (a new one after fork)."""
        completer = self._completer
        keeper = self.lease_keeper
        if completer is None or completer.keeper is not keeper or completer.stopped:
            completer = self._completer = Completer(self.ledger, keeper)
        return completer

    def flush_completions(self) -> None:
        """A worker process stops: write its completions, then stop its writer and lease
        threads (see ``ledger.completer``)."""
        if self._completer is not None and self._completer.keeper is self._keeper:
            self._completer.stop()
        if self._keeper is not None and self._keeper.pid == os.getpid():
            self._keeper.stop()


def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    """A worker needs its ledger: stop at start-up, naming the cause, when it is missing."""
    app = getattr(sender, "app", None)
    if not isinstance(app, SynthCelery):
        return
    try:
        with app.ledger.connect() as conn:
            conn.execute("SELECT 1 FROM synth_jobs LIMIT 0")
    except (ConfigurationError, ServiceUnavailableError) as exc:
        raise SystemExit(f"synth-workers: {exc}") from None
    except psycopg.errors.UndefinedTable:
        raise SystemExit(
            "synth-workers: the job ledger's tables are missing in schema "
            f"{app.settings.db_schema!r}: run `synth-workers db migrate`"
        ) from None
    app.ledger.use_fast_commits()


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from ours."""
    broker = settings.broker_url
    timeout = settings.redis_timeout
    return {
        "broker_url": broker,
        "result_backend": settings.result_backend_url or broker,
        "broker_connection_retry_on_startup": True,
        # Connecting to the broker (kombu's retries included) gives up after this.
        "broker_connection_timeout": timeout,
        # No publish retries in Celery: kombu's retry loop retries every connection error
        # alike, so against a frozen Redis each of its 3 retries would wait the socket
        # timeout again (4 x SYNTH_REDIS_TIMEOUT, plus reconnecting). Task.apply_async
        # decides instead: a timeout is final (the ledger row becomes a tombstone), a
        # connection error that came back at once (a reset socket) is retried once.
        "task_publish_retry": False,
        # Celery's Redis result backend (used by Celery's own APIs only) likewise.
        "redis_socket_timeout": timeout,
        "redis_socket_connect_timeout": timeout,
        # redis:// without kombu's unacked hash: the ledger's leases replace it (broker.py).
        **(
            {"broker_transport": "synth_workers.broker:Transport"}
            if broker.split("://", 1)[0] in ("redis", "rediss")
            else {}
        ),
        "broker_transport_options": {
            "priority_steps": list(range(routing.MIN_PRIORITY, routing.MAX_PRIORITY + 1)),
            "queue_order_strategy": "priority",
            "visibility_timeout": settings.visibility_timeout,
            # what the transport checks of each raw message it reads (screening.py)
            **Limits.from_settings(settings).as_options(),
            # Every synchronous command (a publish, a declare) fails after this instead of
            # waiting for ever on a frozen or cut-off Redis. kombu's BRPOP (1 s on the
            # server) is read from the event loop only once its socket is readable, so no
            # socket timeout applies to it; a half-open BRPOP connection is dropped by
            # kombu's own check (health_check_interval).
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
        },
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "event_serializer": "json",
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": settings.worker_prefetch_multiplier,
        "task_default_priority": routing.DEFAULT_PRIORITY,
        "task_queue_max_priority": routing.MAX_PRIORITY,
        "task_queues": routing.celery_queues(),
        "task_default_queue": routing.DEFAULT,
        "task_routes": (routing.route_task,),
        # The ledger keeps states and results; Celery's result backend stays available for
        # Celery's own APIs but is not written per job.
        "task_ignore_result": True,
        "task_store_errors_even_if_ignored": False,
        "result_expires": settings.job_ttl,
        "worker_consumer": "synth_workers.consumer:Consumer",
        "beat_scheduler": "synth_workers.ledger.scheduler:ExactlyOnceScheduler",
        "worker_hijack_root_logger": False,
        "enable_utc": True,
        "timezone": "UTC",
    }


def create_app(settings: Settings | None = None) -> SynthCelery:
    """Build the platform's Celery app from ``settings`` (the environment when omitted)."""
    settings = settings or load_settings()
    app = SynthCelery(
        settings,
        main="synth_workers",
        task_cls="synth_workers.task:Task",
        control="synth_workers.control:Control",  # revoke cancels in the ledger
        include=[*TASK_MODULES, *settings.include],
    )
    app.config_from_object(celery_config(settings))

    # purge cancels in the ledger what it deleted from Redis (broker.py)
    def cancel_purged(ids: Sequence[str]) -> int:
        return app.ledger.cancel_purged(ids)

    app.conf.broker_transport_options[ON_PURGE] = cancel_purged
    app.steps["worker"].add(SweeperStep)
    signals.task_revoked.connect(revoked_receiver(app), weak=False)
    signals.worker_init.connect(_on_worker_init, weak=False)
    # operations: metrics, health probes, logs (synth_workers.metrics, .health, .logging)
    app.steps["worker"].add(health.OpsStep)
    app.steps["consumer"].add(health.HeartbeatStep)
    signals.worker_init.connect(health.on_worker_init, weak=False)
    signals.worker_shutdown.connect(health.on_worker_shutdown, weak=False)
    app.lifecycle.connect(metrics.observe)
    app.lifecycle.connect(logs.log_job_event)
    signals.setup_logging.connect(
        logs.on_setup_logging(app), weak=False, dispatch_uid="synth-workers-logging"
    )
    signals.task_prerun.connect(logs.bind_job, weak=False)
    signals.task_postrun.connect(logs.unbind_job, weak=False)
    signals.celeryd_init.connect(sentry.on_process_init, weak=False)
    signals.beat_init.connect(sentry.on_process_init, weak=False)

    def flush_completions(**kwargs: Any) -> None:  # a worker process stops: write what's done
        app.flush_completions()

    signals.worker_process_shutdown.connect(flush_completions, weak=False)
    signals.worker_shutdown.connect(flush_completions, weak=False)
    if settings.events_enabled:  # job events on Redis Streams (synth_workers.events)
        from synth_workers.events import connect_events

        events = connect_events(app)

        def flush_events(**kwargs: Any) -> None:  # after flush_completions: its events too
            events.flush()

        signals.worker_process_shutdown.connect(flush_events, weak=False)
        signals.worker_shutdown.connect(flush_events, weak=False)
    from beat_schedule import beat_schedule

    app.conf.beat_schedule = beat_schedule
    return app


def _app_from_environment() -> SynthCelery:
    try:
        created = create_app()
    except ConfigurationError as exc:
        # A wrong environment stops start-up, naming the variable, without a traceback.
        raise SystemExit(f"synth-workers: {exc}") from None
    # `celery -A synth_workers flower`: auth, address and port from our settings
    from synth_workers.flower import apply_flower_defaults

    apply_flower_defaults(created.settings)
    return created


app = _app_from_environment()
