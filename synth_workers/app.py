"""The Celery app: ``create_app(settings)`` and the ``app`` that ``celery -A synth_workers`` finds.

Celery's configuration is derived from :class:`~synth_workers.settings.Settings` here
(:func:`celery_config`) and nowhere else; :func:`synth_workers.install` applies it to any
Celery app. :func:`create_app` is ``install()`` on a :class:`SynthCelery` with our job kinds
and beat schedule. :data:`app` is built on first use, not at import: importing any module of
the package reads no environment and opens no connection.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, cast

from celery import Celery
from celery.local import PromiseProxy

from synth_workers import liveness, routing
from synth_workers.batched import batch_options
from synth_workers.errors import ConfigurationError
from synth_workers.platform import platform_of
from synth_workers.redisconn import celery_redis_config, target_of
from synth_workers.screening import Limits
from synth_workers.settings import Settings, load_settings

if TYPE_CHECKING:
    import redis

    from synth_workers.ledger import LeaseKeeper, Ledger
    from synth_workers.ledger.completer import Completer
    from synth_workers.lifecycle import Lifecycle

#: Our job kinds; ``SYNTH_INCLUDE`` adds the user's own modules.
TASK_MODULES: tuple[str, ...] = (
    "tasks.email",
    "tasks.system",
    "tasks.orchestration",
    "tasks.embeddings",
)


class SynthCelery(Celery):
    """A Celery app installed at construction, with the platform's state as attributes
    (``app.ledger``, ``app.settings``...): shorthands for ``platform_of(app).ledger``..."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from synth_workers.install import install

        install(self, settings)

    @property
    def settings(self) -> Settings:
        return platform_of(self).settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        platform_of(self).settings = value

    @property
    def redis(self) -> redis.Redis:
        """Client for the platform's own reads of the broker (reconciling, depth)."""
        return platform_of(self).redis

    @property
    def ledger(self) -> Ledger:
        return platform_of(self).ledger

    @property
    def lifecycle(self) -> Lifecycle:
        """Where every job state change is announced (events, metrics and logs listen)."""
        return platform_of(self).lifecycle

    @property
    def lease_keeper(self) -> LeaseKeeper:
        """This process's lease keeper (a new one after fork)."""
        return platform_of(self).lease_keeper

    @property
    def completer(self) -> Completer:
        """This process's batched-completion writer (a new one after fork)."""
        return platform_of(self).completer

    def flush_completions(self) -> None:
        platform_of(self).flush_completions()

    def close(self) -> None:
        platform_of(self).close()
        super().close()


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings derived from ours."""
    timeout = settings.redis_timeout
    # broker_url, result_backend and the transport: one Redis server or Sentinel (REDIS_URL,
    # REDIS_SENTINEL_NAME, REDIS_SSL_*: synth_workers.redisconn)
    redis_config = celery_redis_config(target_of(settings), settings.result_backend_url, timeout)
    sentinel_options = redis_config.pop("broker_transport_options")
    return {
        **redis_config,
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
        "broker_transport_options": {
            **sentinel_options,
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
            # A dead link (packets dropped): keepalives and kombu's BRPOP/pub-sub checks
            # every liveness.HEALTH_CHECK_SECONDS drop a half-open connection (liveness.py).
            **liveness.redis_kwargs(),
            # batched mode: messages taken per Redis round trip (synth_workers.batched)
            **batch_options(settings),
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
        # Results are Celery's API on the ledger (synth_workers.backend): not ignored, so
        # AsyncResult.get() waits and the tracer reports chord parts; a job the platform ran
        # writes nothing to Redis but one PUBLISH once its final state commits.
        "task_ignore_result": False,
        "task_store_errors_even_if_ignored": False,
        "result_expires": settings.job_ttl,
        "worker_consumer": "synth_workers.consumer:Consumer",
        "beat_scheduler": "synth_workers.ledger.scheduler:ExactlyOnceScheduler",
        "worker_hijack_root_logger": False,
        "enable_utc": True,
        "timezone": "UTC",
    }


def create_app(settings: Settings | None = None) -> SynthCelery:
    """Build the platform's Celery app from ``settings`` (the environment when omitted):
    our job kinds, ``SYNTH_INCLUDE``'s modules and the beat schedule, installed."""
    settings = settings or load_settings()
    app = SynthCelery(
        settings,
        main="synth_workers",
        task_cls="synth_workers.task:Task",
        include=[*TASK_MODULES, *settings.include],
    )
    from beat_schedule import beat_schedule

    app.conf.beat_schedule = beat_schedule
    return app


def _default_app() -> SynthCelery:
    """The app of ``celery -A synth_workers``, from the environment, made on first use.

    A bad setting raises :class:`~synth_workers.errors.ConfigurationError`; inside the
    ``celery`` program (whose app loader would print a traceback) it prints one line naming
    the variable and exits with ``ExitCode.USAGE`` instead.
    """
    from synth_workers.flower import apply_flower_defaults, celery_subcommand

    try:
        created = create_app()
    except ConfigurationError as exc:
        if celery_subcommand(sys.argv) is None:
            raise
        from synth_workers.clikit import ExitCode

        print(f"synth-workers: {exc}", file=sys.stderr)
        raise SystemExit(ExitCode.USAGE) from None
    # `celery -A synth_workers flower`: auth, address and port from our settings
    apply_flower_defaults(created.settings)
    return created


#: The default app, built on first use (a Celery ``PromiseProxy``: ``isinstance(app, Celery)``
#: holds, and Celery's ``find_app`` takes it).
app = cast(SynthCelery, PromiseProxy(_default_app))
