"""Pytest plugin for Celery's own integration suite (loaded by ``bench/celery_suite.py``).

Two jobs, both without touching the suite's files:

* **record**: at the end of the run, write every test's outcome and pytest's summary counts
  to the JSON file named by ``--synth-report`` (the script compares the two runs from it, not
  from scraped terminal output);
* **platform** (``--synth-platform``): every app the suite builds goes through
  ``synth_workers.install(app)``. The suite builds its apps with
  ``celery.contrib.testing.app.TestApp`` (called by the ``celery_app`` and
  ``celery_session_app`` fixtures of ``celery.contrib.pytest``, the latter also running the
  in-process worker), so wrapping that one factory covers the producer side of every test
  and the worker. ``install`` reads its settings (``DATABASE_URL``, ``SYNTH_DB_SCHEMA``,
  ``REDIS_URL``) from the environment the script sets.

Load it with ``-p bench.celery_suite_plugin`` after ``-p celery.contrib.pytest``, with the
repository root on ``PYTHONPATH``.
"""

from __future__ import annotations

import ast
import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from celery import Celery

#: Outcomes from the best to the worst: a test's outcome is the worst of its reports.
OUTCOME_ORDER = ("passed", "xpassed", "skipped", "xfailed", "rerun", "failed", "error")
#: The report categories pytest prints in its summary line, in its order.
SUMMARY_KEYS = ("failed", "passed", "skipped", "xfailed", "xpassed", "error", "rerun")


class PlatformUnavailableError(RuntimeError):
    """``synth_workers.install`` cannot be imported: the platform run cannot start."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("synth", "SynthStack Workers: Celery suite run")
    group.addoption(
        "--synth-platform",
        action="store_true",
        default=False,
        help="Apply synth_workers.install(app) to every app built by celery.contrib.testing.",
    )
    group.addoption(
        "--synth-cap-timeout",
        type=int,
        default=None,
        help="Cap every test's timeout at this many seconds, the suite's own timeout marks "
        "included (a quick run: a test that hangs costs this, not 300 s).",
    )
    group.addoption(
        "--synth-report",
        default=None,
        help="Write the run's outcomes (per test and pytest's summary counts) to this JSON file.",
    )


#: The session's config, for hooks that are not handed it.
_CONFIG: dict[str, pytest.Config] = {}


class _RetryingAst:
    """pytest's source module's view of :mod:`ast`, whose ``parse`` retries once on
    ``SystemError``. CPython 3.11 keeps the AST converter's recursion counter per
    interpreter, not per thread: pytest parsing a failing test's source while a worker
    thread of the same process (the suite's in-process worker) formats a traceback, which
    3.11 also parses for its carets, can fail with "AST constructor recursion depth
    mismatch" and crash the whole run (INTERNALERROR). A second parse is not disturbed."""

    def __getattr__(self, name: str) -> Any:
        return getattr(ast, name)

    @staticmethod
    def parse(*args: Any, **kwargs: Any) -> Any:
        try:
            return ast.parse(*args, **kwargs)
        except SystemError:
            return ast.parse(*args, **kwargs)


def pytest_configure(config: pytest.Config) -> None:
    _CONFIG["config"] = config
    import _pytest._code.source as pytest_source

    pytest_source.ast = _RetryingAst()  # type: ignore[attr-defined,assignment]
    if config.getoption("synth_platform"):
        try:
            _wrap_test_app()
        except PlatformUnavailableError as exc:
            raise pytest.UsageError(str(exc)) from exc


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cap = config.getoption("synth_cap_timeout")
    if not cap:
        return
    for item in items:
        mark = item.get_closest_marker("timeout")
        own = mark.kwargs.get("timeout", mark.args[0] if mark.args else None) if mark else None
        if own is None or own > cap:
            item.add_marker(pytest.mark.timeout(timeout=cap), append=False)


def _wrap_test_app() -> None:
    """Replace ``TestApp`` where the suite's fixtures look it up by a wrapper that installs
    the platform on the app once Celery's test configuration is applied."""
    try:
        # Issue 13's install() (branch issue13-a); the ignore goes once it is merged.
        from synth_workers import install  # type: ignore[attr-defined,unused-ignore]
    except ImportError as exc:
        raise PlatformUnavailableError(
            f"synth_workers.install is not available on this branch ({exc}): "
            "the platform run needs issue 13's install(app, settings=None)."
        ) from exc

    import celery.contrib.testing.app as testing_app

    original = testing_app.TestApp
    if getattr(original, "_synth_wrapped", False):
        return

    def platform_test_app(*args: Any, **kwargs: Any) -> Celery:
        app = original(*args, **kwargs)
        install(app)
        return app

    platform_test_app._synth_wrapped = True  # type: ignore[attr-defined]
    # ``celery.contrib.pytest._create_app`` imports ``TestApp`` from this module at each
    # call, so the module attribute is the one place to wrap.
    testing_app.TestApp = platform_test_app


def _counts(stats: dict[str, list[Any]]) -> dict[str, int]:
    """pytest's summary counts (reports that count towards the summary), subtests apart."""
    counts: dict[str, int] = {}
    for key, reports in stats.items():
        if not key:
            continue
        n = sum(1 for r in reports if getattr(r, "count_towards_summary", True))
        if n:
            counts[key] = n
    return counts


def _first_errors(stats: dict[str, list[Any]]) -> dict[str, str]:
    """The first failure or error line of each test that has one (``when: message``)."""
    lines: dict[str, str] = {}
    for key in ("failed", "error", "subtests failed"):
        for report in stats.get(key, []):
            nodeid = getattr(report, "nodeid", None)
            if not nodeid or nodeid in lines:
                continue
            crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)
            first = message.strip().splitlines()[0] if message.strip() else ""
            lines[nodeid] = f"{getattr(report, 'when', 'collect')}: {first[:300]}"
    return dict(sorted(lines.items()))


def _outcomes(stats: dict[str, list[Any]], teardown: bool = True) -> dict[str, str]:
    """Each test's worst outcome; a failed subtest makes its test ``failed``.

    ``teardown=False`` leaves out errors raised while tearing a test down (the suite's own
    autouse checks run there), to tell them from a test whose body failed.
    """
    rank = {name: i for i, name in enumerate(OUTCOME_ORDER)}
    result: dict[str, str] = {}
    for key, reports in stats.items():
        if not key or key == "warnings":
            continue
        outcome = key.removeprefix("subtests ").strip()
        if outcome not in rank:
            continue
        if key.startswith("subtests") and outcome not in ("failed", "error"):
            continue  # a passing or skipped subtest says nothing about its test
        for report in reports:
            nodeid = getattr(report, "nodeid", None)
            if not nodeid or (not teardown and getattr(report, "when", None) == "teardown"):
                continue
            if outcome == "rerun" and nodeid in result:
                continue  # a rerun is an intermediate report: the final one decides
            old = result.get(nodeid)
            if old is None or old == "rerun" or rank[outcome] > rank[old]:
                result[nodeid] = outcome
    return dict(sorted(result.items()))


def pytest_runtest_logfinish(nodeid: str, location: object) -> None:
    """After each test, the report so far: a run stopped from outside still leaves one."""
    config = _CONFIG.get("config")
    if config is None or not config.getoption("synth_report"):
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        _write_report(config, reporter.stats, exitstatus=None)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if config.getoption("synth_report"):
        _write_report(config, terminalreporter.stats, exitstatus=int(exitstatus))


def _write_report(
    config: pytest.Config, stats: dict[str, list[Any]], exitstatus: int | None
) -> None:
    """``exitstatus`` None: the run is not over (``partial`` in the report)."""
    path = config.getoption("synth_report")
    counts = _counts(stats)
    outcomes = _outcomes(stats)
    per_outcome = Counter(outcomes.values())
    tmp = Path(f"{path}.tmp")
    tmp.write_text(
        json.dumps(
            {
                "exitstatus": exitstatus,
                "partial": exitstatus is None,
                "platform": bool(config.getoption("synth_platform")),
                "counts": counts,
                "tests_by_outcome": dict(per_outcome),
                "outcomes": outcomes,
                "outcomes_without_teardown": _outcomes(stats, teardown=False),
                "first_errors": _first_errors(stats),
            },
            indent=2,
        )
    )
    tmp.replace(path)  # whole or not at all: the run may be stopped at any moment
