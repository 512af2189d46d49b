"""``install(app)`` on any Celery app, importing without side effects, and the default app.

Worker tests start real ``celery`` worker processes against real Redis and Postgres.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from celery import Celery, signals
from celery.contrib.testing.app import TestApp
from kombu import Queue

import synth_workers
from synth_workers import (
    ConfigurationError,
    JobState,
    Platform,
    Task,
    app,
    create_app,
    install,
    load_settings,
    platform_of,
)
from synth_workers.cli import ExitCode

from .conftest import REDIS_URL, ROOT, wait_until

RECEIVER_SIGNALS = (
    "worker_init",
    "worker_shutdown",
    "worker_process_shutdown",
    "setup_logging",
    "task_prerun",
    "task_postrun",
    "celeryd_init",
    "celeryd_after_setup",
    "beat_init",
)


def _receivers() -> dict[str, int]:
    return {name: len(getattr(signals, name).receivers) for name in RECEIVER_SIGNALS}


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- importing builds nothing -----------------------------------------------------------------


@pytest.mark.parametrize("module", ["synth_workers.errors", "synth_workers", "tasks.system"])
def test_importing_with_a_bad_setting_succeeds(module: str) -> None:
    proc = _python(f"import {module}", SYNTH_MAX_ATTEMPTS="0")
    assert proc.returncode == 0, proc.stderr


def test_importing_every_module_reads_no_setting_and_connects_nowhere() -> None:
    # Every module of the package, with settings that would fail and services that are
    # not there: an import that built the app or connected would fail or hang.
    code = (
        "import pkgutil, importlib, synth_workers\n"
        "for m in pkgutil.walk_packages(synth_workers.__path__, 'synth_workers.'):\n"
        "    importlib.import_module(m.name)\n"
        "from synth_workers.app import app\n"
        "assert not app.__evaluated__()\n"
        "print('ok')\n"
    )
    proc = _python(
        code,
        SYNTH_MAX_ATTEMPTS="0",
        REDIS_URL="redis://127.0.0.1:1/0",
        DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_the_default_app_raises_configuration_error_on_first_use() -> None:
    code = (
        "from synth_workers import app, ConfigurationError, SynthCelery\n"
        "try:\n"
        "    app.conf\n"
        "except ConfigurationError as exc:\n"
        "    print('ConfigurationError', exc)\n"
    )
    proc = _python(code, SYNTH_MAX_ATTEMPTS="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ConfigurationError"), proc.stdout
    assert "SYNTH_MAX_ATTEMPTS" in proc.stdout


@pytest.mark.parametrize("command", ["worker", "beat"])
def test_celery_command_with_a_bad_setting_prints_one_line(command: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "synth_workers", command],
        cwd=ROOT,
        env={**os.environ, "SYNTH_MAX_ATTEMPTS": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == ExitCode.USAGE, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("synth-workers: ")
    assert "SYNTH_MAX_ATTEMPTS" in lines[0]


def test_the_default_app_is_a_celery_app_celery_finds() -> None:
    from celery.app.utils import find_app

    assert isinstance(app, Celery)
    assert find_app("synth_workers") is synth_workers.app
    assert isinstance(platform_of(app), Platform)


# --- receivers and idempotency -------------------------------------------------------------


def test_create_app_three_times_connects_receivers_once() -> None:
    first = create_app()
    after_first = _receivers()
    assert after_first["worker_init"] >= 1
    more = [create_app(), create_app()]
    assert _receivers() == after_first
    for built in (first, *more):
        built.close()


def test_install_twice_changes_nothing() -> None:
    plain = Celery("twice", broker=REDIS_URL)
    platform = install(plain)
    conf = dict(plain.conf)
    steps = {name: set(group) for name, group in plain.steps.items()}
    receivers = _receivers()
    listeners = len(platform.lifecycle._listeners)

    assert install(plain) is platform
    assert install(plain, platform.settings) is platform
    assert dict(plain.conf) == conf
    assert {name: set(group) for name, group in plain.steps.items()} == steps
    assert _receivers() == receivers
    assert len(platform.lifecycle._listeners) == listeners
    other = load_settings(max_attempts=7)
    with pytest.raises(ConfigurationError, match="already installed"):
        install(plain, other)


def test_install_takes_the_apps_own_broker() -> None:
    url = "redis://127.0.0.1:6379/9"
    plain = Celery("own-broker", broker=url)
    platform = install(plain)
    assert platform.settings.broker_url == url
    assert plain.conf.broker_url == url
    assert plain.conf.broker_transport == "synth_workers.broker:Transport"
    assert plain.conf.beat_scheduler == "synth_workers.ledger.scheduler:ExactlyOnceScheduler"


def test_platform_of_an_app_never_installed_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="install"):
        platform_of(Celery("bare"))


def test_install_refuses_a_broker_that_is_not_redis() -> None:
    with pytest.raises(ConfigurationError, match="REDIS_URL"):
        install(TestApp())  # Celery's test app: broker mem://


def test_tasks_defined_after_install_get_the_platform_task() -> None:
    plain = TestApp(broker=REDIS_URL)
    install(plain)

    @plain.task(name="tests.adopted.after")
    def after(x: int) -> int:
        return x

    assert isinstance(after, Task)
    assert plain.tasks["tests.adopted.after"].acks_late is True


def test_an_adopted_app_keeps_its_own_queues() -> None:
    plain = Celery("queues", broker=REDIS_URL, set_as_current=False)
    install(plain)
    assert set(plain.amqp.queues) == {"celery"}  # Celery's default queue, as before
    assert plain.conf.task_default_queue == "celery"
    routed = Celery("routed", broker=REDIS_URL, set_as_current=False)
    routed.conf.task_queues = [Queue("mine")]
    routed.conf.task_default_queue = "mine"
    install(routed)
    assert set(routed.amqp.queues) == {"mine"}
    # the platform's own app declares its job kinds' queues
    assert {"default", "email", "orchestration", "embeddings"} <= set(create_app().amqp.queues)


def test_tasks_built_before_install_are_rebased() -> None:
    plain = Celery("before", broker=REDIS_URL, set_as_current=False)

    @plain.task(name="tests.adopted.before")
    def before(x: int) -> int:
        return x

    plain.finalize()
    built = plain.tasks["tests.adopted.before"]
    assert not isinstance(built, Task)
    assert built.acks_late is False  # Celery's default, copied onto the class at bind
    install(plain)
    assert isinstance(plain.tasks["tests.adopted.before"], Task)
    assert plain.tasks["tests.adopted.before"] is built
    assert built.acks_late is True  # now from the platform's configuration


class _WorkerSender:
    """What ``worker_init`` is sent with: a worker, which has an ``app`` and a ``hostname``."""

    def __init__(self, app: Celery, hostname: str) -> None:
        self.app = app
        self.hostname = hostname


def test_receivers_act_only_for_installed_apps() -> None:
    # A worker of an app that was never installed is left alone; a worker of an installed
    # app whose ledger is missing stops at start-up, naming it.
    bare = Celery("bare-worker")
    signals.worker_init.send(sender=_WorkerSender(bare, "bare@test"))
    broken = Celery("broken", broker=REDIS_URL)
    install(broken, load_settings(database_url="postgresql://nobody@127.0.0.1:1/none"))
    with pytest.raises(SystemExit, match="Postgres is not reachable"):
        signals.worker_init.send(sender=_WorkerSender(broken, "broken@test"))


# --- real workers ------------------------------------------------------------------------------


def test_adopted_plain_celery_app_runs_a_job_through_the_ledger(
    rclient: Any, start_worker: Any
) -> None:
    start_worker("default", app="tests.plain_app")
    from tests.plain_app import app as plain_app
    from tests.plain_app import double

    assert isinstance(double, Task)
    result = double.delay(21)
    ledger = platform_of(plain_app).ledger
    row = ledger.get(result.id)
    assert row is not None  # written before the message was published
    assert row["task"] == "tests.plain_app.double"
    assert row["queue"] == "celery"  # the adopted app's own default queue, routed by Celery
    assert wait_until(lambda: ledger.get(result.id)["state"] == JobState.SUCCEEDED, timeout=30)
    assert ledger.get(result.id)["result"] == 42


def test_plain_celery_producer_with_default_settings_is_consumed_and_recorded(
    rclient: Any, start_worker: Any
) -> None:
    start_worker("default")
    producer = Celery(broker=REDIS_URL)
    try:
        sent = producer.send_task("tests.e2e_tasks.side_effect", kwargs={"key": "plain"})
        assert producer.conf.task_default_queue == "celery"
    finally:
        producer.close()
    assert wait_until(lambda: int(rclient.get("test:count:plain") or 0) == 1, timeout=30)
    assert wait_until(
        lambda: (app.ledger.get(sent.id) or {}).get("state") == JobState.SUCCEEDED, timeout=30
    )
    row = app.ledger.get(sent.id)
    assert row["task"] == "tests.e2e_tasks.side_effect"
    assert row["queue"] == "celery"
    assert row["payload"] == {"key": "plain"}


def test_a_worker_of_default_consumes_celerys_default_queue_too(
    rclient: Any, start_worker: Any
) -> None:
    worker = start_worker("default")
    replies = app.control.inspect(destination=[worker.name], timeout=5).active_queues() or {}
    names = {q["name"] for q in replies.get(worker.name, [])}
    assert names == {"default", "celery"}
    other = start_worker("email")
    replies = app.control.inspect(destination=[other.name], timeout=5).active_queues() or {}
    assert {q["name"] for q in replies.get(other.name, [])} == {"email"}


def test_apps_of_one_database_share_one_pool() -> None:
    # Any number of apps installed in one process (a test app per test, say) open one pool
    # of Postgres connections between them, not one each.
    settings = load_settings(db_pool_size=3)  # a size no other ledger of this process uses
    first = install(Celery("pool-a", broker=REDIS_URL, set_as_current=False), settings)
    second = install(Celery("pool-b", broker=REDIS_URL, set_as_current=False), settings)
    assert first.ledger.pool is second.ledger.pool
    first.ledger.close()  # the other app still holds it
    with second.ledger.connection() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    pool = second.ledger.pool
    second.ledger.close()  # the last holder closes it
    assert pool.closed


def test_inspect_stats_answers(start_worker: Any) -> None:
    # The worker's stats carry the transport options: they must stay JSON (the purge hook
    # is named by a token, not set as a callable).
    worker = start_worker("default")
    replies = app.control.inspect(destination=[worker.name], timeout=5).stats() or {}
    assert "synth_on_purge" in replies[worker.name]["broker"]["transport_options"]


def test_the_wheel_ships_every_data_file_of_the_packages(tmp_path: Any) -> None:
    """A non-editable install (the Docker images' ``pip install .``) reads the migrations
    (``synth-workers db migrate``) and the email templates from the installed package:
    every file of ``synth_workers`` and ``tasks`` that is not Python is in the wheel."""
    import shutil
    import zipfile
    from pathlib import Path

    # from a copy, so that no build/ left in the checkout hides a file the build misses
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in ("synth_workers", "tasks"):
        shutil.copytree(Path(ROOT) / package, source / package, ignore=skip)
    for name in ("pyproject.toml", "README.md", "beat_schedule.py"):
        shutil.copy(Path(ROOT) / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    wheel = next(tmp_path.glob("*.whl"))
    shipped = set(zipfile.ZipFile(wheel).namelist())
    data = {
        path.relative_to(ROOT).as_posix()
        for package in ("synth_workers", "tasks")
        for path in (Path(ROOT) / package).rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc") and "__pycache__" not in path.parts
    }
    assert any(name.endswith("0001_ledger.sql") for name in data)
    assert data - shipped == set()
