"""``install(app)``: turn any Celery app into a platform app, idempotently.

What it plugs in, all through Celery's own extension points:

- configuration derived from the settings (:func:`synth_workers.app.celery_config`): the
  ledger-backed Redis transport, priorities, result backend options, the exactly-once beat
  scheduler, the platform's consumer. The queue topology (``task_queues``,
  ``task_default_queue``, ``task_routes``) is the platform's only on its own app
  (:func:`~synth_workers.app.create_app`); an adopted app keeps its own, so a plain app's
  tasks stay on Celery's ``celery`` queue (a worker of ``default`` consumes it too);
- the task base class: ``app.Task`` becomes the platform's :class:`~synth_workers.task.Task`
  (bound to ``app``), so every ``@app.task`` defined afterwards gets it; tasks the app had
  already built are rebased onto it (see :func:`_rebase_tasks` for the one limit);
- worker bootsteps (ledger sweeper, batch tier, ops server, heartbeat, the pool's exit
  watch: ``synth_workers.poolwatch``);
- lifecycle listeners (metrics, job log lines, Redis Streams events);
- request tracing: the running job's request id (``synth_workers.correlation``) and, with
  the ``otel`` extra, OpenTelemetry's Celery instrumentation (``synth_workers.tracing``);
- signal receivers. Each signal gets *one* receiver per process (a fixed ``dispatch_uid``),
  connected by the first ``install()``; it finds the app the signal is about from its sender
  (the worker, the task, the beat service; the current app for the signals Celery sends
  without one) and does nothing for an app that was never installed. So any number of
  installed apps leave the receiver lists as the first left them, and one app's receivers
  never act for another.

The platform's state lives in a :class:`~synth_workers.platform.Platform` stored on the app:
``platform_of(app).ledger``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import psycopg
from celery import Celery, signals
from celery._state import get_current_app

from synth_workers import (
    correlation,
    groups,
    health,
    jsonfast,
    liveness,
    metrics,
    routing,
    sentry,
    tracing,
)
from synth_workers import logging as logs
from synth_workers.announce import connect_results
from synth_workers.batchtier.tier import BatchTierStep
from synth_workers.broker import ON_PURGE, FillWindow, register_purge_hook
from synth_workers.control import on_task_revoked
from synth_workers.errors import ConfigurationError, ServiceUnavailableError
from synth_workers.ledger.sweeper import SweeperStep
from synth_workers.platform import PLATFORM_ATTR, Platform, find_platform
from synth_workers.poolwatch import PoolExitStep
from synth_workers.redisconn import sentinel_settings
from synth_workers.settings import Settings, load_settings

#: The platform's base Task, as Celery's ``task_cls`` string.
TASK_CLS = "synth_workers.task:Task"

_lock = threading.Lock()
_connected = False
#: Every installed app's platform in this process (weak: a dropped app drops out).
_platforms: weakref.WeakSet[Platform] = weakref.WeakSet()


def install(app: Celery, settings: Settings | None = None) -> Platform:
    """Make ``app`` a platform app and return its :class:`Platform`.

    ``settings``: the platform's settings; when omitted, the environment's, with the app's own
    ``broker_url`` (when it has one) as ``REDIS_URL`` (with kombu's ``master_name`` and
    ``sentinel_kwargs`` transport options for a ``sentinel://`` one). A second call returns the same
    platform and changes nothing; with different ``settings`` it raises
    :class:`ConfigurationError` rather than rewire a running app.
    """
    with _lock:
        platform = find_platform(app)
        if platform is not None:
            if settings is not None and settings != platform.settings:
                raise ConfigurationError(
                    f"Celery app {app.main!r} is already installed with other settings"
                )
            return platform
        if settings is None:
            own_broker = app.conf.broker_url
            sentinel = sentinel_settings(app.conf.broker_transport_options)
            settings = (
                load_settings(redis_url=own_broker, **sentinel) if own_broker else load_settings()
            )
        platform = Platform(app, settings)
        before = _config_of_tasks(app)
        platform.routes_by_kind = _configure(app, settings)
        # revoke cancels in the ledger (synth_workers.control)
        app.control_cls = "synth_workers.control:Control"
        app.__dict__.pop("control", None)
        # purge cancels in the ledger what it deleted from Redis (synth_workers.broker)
        app.conf.broker_transport_options[ON_PURGE] = register_purge_hook(
            platform.ledger.cancel_purged
        )
        _use_platform_task(app, before)
        groups.install()  # a group of one task's plain signatures: in bulk (synth_workers.groups)
        jsonfast.register()  # kombu's JSON decoding, faster and the same (synth_workers.jsonfast)
        app.steps["worker"].add(SweeperStep)
        app.steps["worker"].add(BatchTierStep)
        app.steps["worker"].add(health.OpsStep)
        app.steps["worker"].add(PoolExitStep)
        app.steps["consumer"].add(health.HeartbeatStep)
        app.steps["consumer"].add(liveness.BoundedHeartbeat)
        app.steps["consumer"].add(FillWindow)
        lifecycle = platform.lifecycle
        lifecycle.connect(metrics.observe)
        lifecycle.connect(logs.log_job_event)
        # the ledger as Celery's result backend (synth_workers.backend)
        platform.results = connect_results(app, lifecycle)
        if settings.events_enabled:  # job events on Redis Streams (synth_workers.events)
            from synth_workers.events import connect_events

            platform.events = connect_events(platform)
        if settings.tracing_enabled:  # with the otel extra (synth_workers.tracing)
            tracing.enable()
        setattr(app, PLATFORM_ATTR, platform)
        _platforms.add(platform)
        _connect_receivers()
        return platform


#: The queue topology: the platform's own app declares its job kinds' queues and routes; an
#: adopted app keeps its own (Celery's ``celery`` queue unless it declared others).
TOPOLOGY_KEYS = ("task_queues", "task_default_queue", "task_routes")


def _configure(app: Celery, settings: Settings) -> bool:
    """Apply the platform's Celery configuration; returns whether the queue topology is the
    platform's (see :data:`TOPOLOGY_KEYS`)."""
    from synth_workers.app import SynthCelery, celery_config

    config = celery_config(settings)
    own = isinstance(app, SynthCelery)
    if not own:
        for key in TOPOLOGY_KEYS:
            del config[key]
    app.conf.update(config)
    return own


# --- the task base ---------------------------------------------------------------------------


def _config_of_tasks(app: Celery) -> dict[str, Any]:
    """The configuration values Celery copies onto task classes (``Task.from_config``)."""
    from celery.app.task import Task as CeleryTask

    return {key: app.conf[key] for _, key in CeleryTask.from_config}


def _use_platform_task(app: Celery, before: dict[str, Any]) -> None:
    """``app.Task`` becomes the platform's Task; tasks built before are rebased onto it."""
    from synth_workers.task import Task as PlatformTask

    old_base = app.__dict__.get("Task")  # Celery's cached_property, if it was read already
    app.task_cls = TASK_CLS
    app.__dict__.pop("Task", None)
    new_base = app.Task
    if old_base is not None and not issubclass(old_base, PlatformTask):
        _rebase_tasks(app, old_base, new_base, before)


def _rebase_tasks(app: Celery, old_base: type, new_base: type, before: dict[str, Any]) -> None:
    """Put the platform's Task under each task ``app`` built on ``old_base``.

    Celery builds a task as a one-off class whose single base is ``app.Task``, so swapping
    that base gives the task every platform method. The limit: options Celery copied from the
    configuration onto the task class when it was bound (``acks_late``, ``ignore_result``...)
    were taken from the configuration *before* install; those still equal to Celery's defaults
    are dropped so they come from the platform's configuration, a value set on the task
    itself stays. Installing before the app is finalized (before any task is used) avoids
    the question: pending tasks are then built on the platform's Task directly.
    """
    conf = app.conf
    for task in list(app.tasks.values()):
        cls = type(task)
        if cls.__bases__ != (old_base,):
            continue
        cls.__bases__ = (new_base,)
        for attr, key in cls.from_config:
            if attr in cls.__dict__ and cls.__dict__[attr] == before[key]:
                setattr(cls, attr, conf[key])  # copied from the old configuration: renew
        cls._exec_options = None  # type: ignore[attr-defined]  # Celery's options cache


# --- signal receivers: one per signal and process, each finds its app ----------------------


def _connect_receivers() -> None:
    global _connected
    if _connected:
        return
    receivers: list[tuple[Any, Callable[..., None]]] = [
        (signals.worker_init, _on_worker_init),
        (signals.worker_shutdown, _on_worker_shutdown),
        (signals.worker_process_shutdown, _on_worker_process_shutdown),
        (signals.setup_logging, _on_setup_logging),
        (signals.task_prerun, _on_task_prerun),
        (signals.task_postrun, _on_task_postrun),
        (signals.celeryd_init, _on_celeryd_init),
        (signals.celeryd_after_setup, _on_celeryd_after_setup),
        (signals.beat_init, _on_beat_init),
        (signals.task_revoked, on_task_revoked),
    ]
    for signal, receiver in receivers:
        signal.connect(receiver, weak=False, dispatch_uid=f"synth-workers:{receiver.__name__}")
    _connected = True


def _current_platform() -> Platform | None:
    """The platform of this process's current app, for the signals Celery sends without a
    sender; when the current app is none of ours, the one installed app if there is one."""
    platform = find_platform(get_current_app())
    if platform is None and len(_platforms) == 1:
        platform = next(iter(_platforms))
    return platform


def _on_worker_init(sender: Any = None, **kwargs: Any) -> None:
    """``worker_init``: a worker needs its ledger; stop at start-up naming the cause."""
    platform = find_platform(getattr(sender, "app", None))
    if platform is None:
        return
    try:
        with platform.ledger.connect() as conn:
            platform.ledger.check_tables(conn)
    except (ConfigurationError, ServiceUnavailableError) as exc:
        raise SystemExit(f"synth-workers: {exc}") from None
    except psycopg.errors.UndefinedTable:
        raise SystemExit(
            "synth-workers: the job ledger's tables are missing in schema "
            f"{platform.settings.db_schema!r}: run `synth-workers db migrate`"
        ) from None
    platform.ledger.use_fast_commits()
    health.on_worker_init(sender=sender, settings=platform.settings)


def _flush(platform: Platform) -> None:
    """A worker process stops: write what is done, then its events."""
    platform.flush_completions()
    if platform.results is not None:  # waiters hear of what was just written
        platform.results.flush()
    events = platform.events
    if events is not None:
        events.flush()


def _on_worker_shutdown(sender: Any = None, **kwargs: Any) -> None:
    platform = find_platform(getattr(sender, "app", None))
    if platform is None:
        return
    health.on_worker_shutdown()
    _flush(platform)


def _on_worker_process_shutdown(sender: Any = None, **kwargs: Any) -> None:
    platform = _current_platform()
    if platform is not None:
        _flush(platform)


def _on_setup_logging(loglevel: int | str | None = None, logfile: str | None = None,
                      **kwargs: Any) -> None:  # fmt: skip
    """``setup_logging``: the platform's logging (Celery then installs no handler itself)."""
    platform = _current_platform()
    if platform is not None:
        logs.on_setup_logging(platform)(loglevel=loglevel, logfile=logfile)


def _on_task_prerun(sender: Any = None, **kwargs: Any) -> None:
    if find_platform(getattr(sender, "app", None)) is not None:
        correlation.enter_job(sender)  # the jobs it sends carry its request id
        logs.bind_job(**kwargs)


def _on_task_postrun(sender: Any = None, **kwargs: Any) -> None:
    if find_platform(getattr(sender, "app", None)) is not None:
        logs.unbind_job()
        correlation.leave_job(sender)


def _on_celeryd_init(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    platform = find_platform(getattr(instance, "app", None))
    if platform is not None:
        sentry.init_sentry(platform.settings)


def _on_celeryd_after_setup(sender: Any = None, instance: Any = None, **kwargs: Any) -> None:
    """``celeryd_after_setup`` (``-Q`` applied): a worker of ``default`` also consumes
    Celery's default queue ``celery`` (see :mod:`synth_workers.routing`)."""
    platform = find_platform(getattr(instance, "app", None))
    if platform is None:
        return
    queues = platform.app.amqp.queues
    consumed = queues.consume_from
    if consumed is None:  # no -Q: every declared queue, ``celery`` included
        return
    for name in routing.with_celery_default(list(consumed)):
        if name not in consumed:
            queues.select_add(queues[name])


def _on_beat_init(sender: Any = None, **kwargs: Any) -> None:
    platform = find_platform(getattr(sender, "app", None))
    if platform is not None:
        sentry.init_sentry(platform.settings)
