"""Celery's own integration suite as the compatibility spec: stock Celery vs the platform.

Runs ``t/integration/test_canvas.py`` and ``t/integration/test_tasks.py`` from the celery
sdist of the installed Celery version twice, against real Redis and Postgres:

* ``stock``: the suite as Celery ships it, Redis broker and Redis result backend
  (``TEST_BROKER`` = ``TEST_BACKEND`` = ``<redis>/6``);
* ``platform``: the same, with ``synth_workers.install(app)`` applied to every app the suite
  builds (``bench/celery_suite_plugin.py``, ``--synth-platform``), Redis ``<redis>/7`` and the
  ledger in Postgres schema ``celery_suite`` (dropped, then migrated, before the run).

The suite's files are not changed. The sdist is downloaded once into the cache folder with
``pip download --no-deps --no-binary :all: celery==<version>``; its own ``celery/`` folder is
removed so that the installed package is the one under test.

Prints both runs' pass/fail/skip/xfail/xpass counts and the tests that pass on stock but not on
the platform, and writes a JSON summary (``--out``). Needs the ``celery-suite`` extra
(``pip install -e '.[celery-suite]'``). Run from the repository root::

    .venv/bin/python -m bench.celery_suite                    # both runs, about 20 min each
    .venv/bin/python -m bench.celery_suite --only stock -k chord
    .venv/bin/python -m bench.celery_suite --only platform --quick 15 \
        --compare bench/results/celery_suite_stock.json      # map differences fast

``--quick S`` turns the suite's reruns off and caps every test at S seconds: a quick map of
what differs, not a result. ``--compare`` takes the stock side from an earlier summary. A run
cut by ``--run-timeout`` still reports the tests it ran (the plugin writes its report after
every test); its comparison covers those only.

Exit status: 0 when every run finished (whatever its failures: the comparison is the
output), 1 when a run could not start or was cut by ``--run-timeout``, 2 on bad usage or a
missing prerequisite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from importlib.util import find_spec
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

SUITE_FILES = ("t/integration/test_canvas.py", "t/integration/test_tasks.py")
#: Pytest plugins the suite's files import or mark with (module names).
SUITE_PLUGINS = {
    "pytest_rerunfailures": "pytest-rerunfailures",
    "pytest_timeout": "pytest-timeout",
    "pytest_subtests": "pytest-subtests",
    "pytest_order": "pytest-order",
    "pydantic": "pydantic",
}
SIDES = ("stock", "platform")
#: Redis database per side: the runs never see each other's keys.
REDIS_DB = {"stock": 6, "platform": 7}
#: An outcome counted as passing when comparing the runs.
PASSING = frozenset({"passed", "xpassed"})


class SuiteError(RuntimeError):
    """A prerequisite of the run is missing or broken (exit status 2)."""


@dataclass
class SideResult:
    """One run of the suite: what pytest reported, and where its output is."""

    side: str
    returncode: int | None
    seconds: float
    log: str
    broker: str
    counts: dict[str, int] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)
    #: The same, not counting errors raised at teardown (the suite's autouse checks).
    outcomes_without_teardown: dict[str, str] = field(default_factory=dict)
    #: The first failure line of each test that failed or errored.
    first_errors: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    #: The report stops short of the end (the run was cut): counts cover the tests run.
    partial: bool = False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.celery_suite",
        description="Run Celery's integration suite on stock Celery and on the platform.",
    )
    parser.add_argument("--only", choices=SIDES, help="Run one side only.")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression, passed through.")
    parser.add_argument(
        "--timeout", type=int, default=300, help="Per-test timeout in seconds (pytest-timeout)."
    )
    parser.add_argument(
        "--run-timeout",
        type=int,
        default=3600,
        help="Limit for one whole run in seconds; the run is stopped and reported as cut.",
    )
    parser.add_argument(
        "--redis",
        default=os.environ.get("SYNTH_SUITE_REDIS", "redis://127.0.0.1:6379"),
        help="Redis server URL without a database; the runs use databases 6 and 7 "
        "(env SYNTH_SUITE_REDIS).",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get(
            "SYNTH_SUITE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/synth_e"
        ),
        help="Postgres for the platform's ledger (env SYNTH_SUITE_DATABASE_URL).",
    )
    parser.add_argument(
        "--schema", default="celery_suite", help="Ledger schema; dropped and migrated per run."
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=RESULTS / "celery-suite",
        help="Where the sdist is downloaded and extracted, and the logs are written.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "celery_suite.json",
        help="JSON summary of both runs.",
    )
    parser.add_argument(
        "--quick",
        type=int,
        metavar="SECONDS",
        help="A quick run: no reruns of the suite's flaky tests (-p no:rerunfailures) and "
        "every test capped at SECONDS, its own timeout mark included. Counts then differ "
        "from a full run; use it to map differences, not to report the result.",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        help="A summary JSON from an earlier run whose stock side is compared with this run's "
        "platform side (with --only platform).",
    )
    args = parser.parse_args(argv)
    if args.compare is not None and args.only != "platform":
        parser.error("--compare goes with --only platform")
    if args.compare is not None and not args.compare.is_file():
        parser.error(f"--compare: no such file {args.compare}")
    if args.timeout <= 0 or args.run_timeout <= 0 or (args.quick is not None and args.quick <= 0):
        parser.error("--timeout, --run-timeout and --quick must be positive")
    args.redis = args.redis.rstrip("/")
    if not args.redis.startswith(("redis://", "rediss://")):
        parser.error("--redis must be a redis:// URL")
    if args.redis.count("/") > 2:
        parser.error("--redis takes the server only (redis://host:port), not a database")
    if not args.schema.isidentifier():
        parser.error("--schema must be a plain identifier")
    return args


# --- the suite -----------------------------------------------------------------------------
def check_plugins() -> None:
    """The suite's own test dependencies must be importable (they are not Celery's)."""
    missing = [dist for module, dist in SUITE_PLUGINS.items() if find_spec(module) is None]
    if missing:
        raise SuiteError(
            f"missing {', '.join(missing)}: install the extra with "
            "`.venv/bin/pip install -e '.[celery-suite]'`"
        )


def ensure_suite(cache_dir: Path, celery_version: str) -> Path:
    """The extracted sdist of ``celery_version`` without its ``celery/`` package.

    Downloaded and extracted once; a folder without the suite's files is rebuilt.
    """
    root = cache_dir / f"celery-{celery_version}"
    if all((root / name).is_file() for name in SUITE_FILES) and not (root / "celery").exists():
        return root
    downloads = cache_dir / "downloads"
    archive = downloads / f"celery-{celery_version}.tar.gz"
    if not archive.is_file():
        downloads.mkdir(parents=True, exist_ok=True)
        print(f"downloading the celery {celery_version} sdist into {downloads}", flush=True)
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"celery=={celery_version}",
                "-d",
                str(downloads),
            ],
            check=False,
        )
        if done.returncode != 0 or not archive.is_file():
            raise SuiteError(f"could not download the celery {celery_version} sdist")
    if root.exists():
        shutil.rmtree(root)
    with tarfile.open(archive) as tar:
        tar.extractall(cache_dir, filter="data")
    if not all((root / name).is_file() for name in SUITE_FILES):
        raise SuiteError(f"{archive} holds no {', '.join(SUITE_FILES)}")
    # Run from the archive's root, its own copy of the package would shadow the installed one.
    shutil.rmtree(root / "celery")
    return root


# --- services ------------------------------------------------------------------------------
def reset_redis(url: str) -> None:
    """Empty the run's own Redis database (never another one)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


def reset_ledger(database_url: str, schema: str, env: dict[str, str]) -> None:
    """Drop the run's ledger schema and apply the platform's migrations afresh."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
    done = subprocess.run(
        [sys.executable, "-c", "from synth_workers.cli import main; main()", "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SuiteError(f"ledger migration failed: {(done.stderr or done.stdout).strip()}")


# --- one run -------------------------------------------------------------------------------
def side_env(side: str, args: argparse.Namespace) -> dict[str, str]:
    url = f"{args.redis}/{REDIS_DB[side]}"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TEST_BROKER"] = url
    env["TEST_BACKEND"] = url
    if side == "platform":
        env["REDIS_URL"] = url
        env["DATABASE_URL"] = args.database_url
        env["SYNTH_DB_SCHEMA"] = args.schema
    return env


def pytest_command(side: str, args: argparse.Namespace, report: Path) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "celery.contrib.pytest",
        "-p",
        "bench.celery_suite_plugin",
        f"--synth-report={report}",
        f"--timeout={args.timeout}",
        "-o",
        "cache_dir=.pytest_cache",
        "-q",
        "-rfEX",
        *SUITE_FILES,
    ]
    if side == "platform":
        cmd.append("--synth-platform")
    if args.quick:
        cmd += ["-p", "no:rerunfailures", f"--synth-cap-timeout={args.quick}"]
    if args.keyword:
        cmd += ["-k", args.keyword]
    return cmd


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a pytest run: Ctrl-C first (pytest still prints its summary), then its group."""
    for sig, grace in ((signal.SIGINT, 60), (signal.SIGTERM, 20), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            if sig == signal.SIGINT:
                os.kill(proc.pid, sig)
            else:
                os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_side(side: str, root: Path, args: argparse.Namespace) -> SideResult:
    """Run the suite once; its output goes to ``<cache>/<side>.log``."""
    env = side_env(side, args)
    log = args.cache_dir / f"{side}.log"
    report = args.cache_dir / f"{side}-report.json"
    report.unlink(missing_ok=True)
    result = SideResult(side, None, 0.0, str(log), env["TEST_BROKER"])
    try:
        reset_redis(env["TEST_BROKER"])
        if side == "platform":
            reset_ledger(args.database_url, args.schema, env)
    except Exception as exc:  # any failure to prepare is reported, the other side still runs
        result.error = f"setup: {exc}"
        return result
    cmd = pytest_command(side, args, report)
    print(f"[{side}] {shlex.join(cmd[2:])}\n[{side}] output: {log}", flush=True)
    started = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            result.returncode = proc.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            result.error = f"cut after {args.run_timeout} s (--run-timeout)"
            stop(proc)
    result.seconds = round(time.monotonic() - started, 1)
    if report.is_file():
        data = json.loads(report.read_text())
        result.counts = data["counts"]
        result.outcomes = data["outcomes"]
        result.outcomes_without_teardown = data.get("outcomes_without_teardown", {})
        result.partial = bool(data.get("partial"))
        result.first_errors = data.get("first_errors", {})
    elif result.error is None:
        result.error = f"pytest exited {result.returncode} without a report: see {log}"
    return result


# --- report --------------------------------------------------------------------------------
def summary_line(result: SideResult) -> str:
    c = result.counts
    keys = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "rerun")
    text = ", ".join(f"{c.get(k, 0)} {k}" for k in keys)
    subtests = {k.removeprefix("subtests "): v for k, v in c.items() if k.startswith("subtests ")}
    if subtests:
        text += " (subtests: " + ", ".join(f"{v} {k}" for k, v in sorted(subtests.items())) + ")"
    if result.partial:
        text += " [partial: counts cover the tests run]"
    if result.error:
        text += f" [{result.error}]"
    return f"{result.side:8} {text} in {result.seconds:.0f} s"


def regressions(
    stock: dict[str, str], platform: dict[str, str], keyword_run: bool = False
) -> dict[str, str]:
    """Tests passing on stock that do not pass on the platform, with the platform's outcome.

    ``keyword_run``: the platform ran a ``-k`` selection, so a test it did not run is not
    counted against it.
    """
    return {
        test: platform.get(test, "not run")
        for test, outcome in stock.items()
        if outcome in PASSING
        and platform.get(test) not in PASSING
        and not (keyword_run and test not in platform)
    }


def load_stock(path: Path) -> SideResult:
    """The stock side of an earlier summary (``--compare``)."""
    data = json.loads(path.read_text())
    try:
        return SideResult(**data["runs"]["stock"])
    except (KeyError, TypeError) as exc:
        raise SuiteError(f"{path} holds no stock run ({exc})") from exc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    celery_version = version("celery")
    try:
        check_plugins()
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        root = ensure_suite(args.cache_dir, celery_version)
    except SuiteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sides = [args.only] if args.only else list(SIDES)
    results: dict[str, SideResult] = {}
    if args.compare is not None:
        try:
            results["stock"] = load_stock(args.compare)
        except SuiteError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    results.update({side: run_side(side, root, args) for side in sides})

    print(f"\nCelery {celery_version} / kombu {version('kombu')}: {', '.join(SUITE_FILES)}")
    for result in results.values():
        print(summary_line(result))
    summary: dict[str, Any] = {
        "celery": celery_version,
        "kombu": version("kombu"),
        "files": list(SUITE_FILES),
        "keyword": args.keyword,
        "quick": args.quick,
        "timeout": args.timeout,
        "runs": {side: asdict(r) for side, r in results.items()},
    }
    if len(results) == 2 and not all(r.outcomes for r in results.values()):
        print("\nno comparison: a run reported no outcomes (see its error above)")
    elif len(results) == 2:
        stock, platform = results["stock"], results["platform"]
        keyword_run = bool(args.keyword) or platform.partial
        lost = regressions(stock.outcomes, platform.outcomes, keyword_run)
        bodies = regressions(
            stock.outcomes_without_teardown or stock.outcomes,  # summaries before the field
            platform.outcomes_without_teardown or platform.outcomes,
            keyword_run,
        )
        summary["pass_on_stock_not_on_platform"] = lost
        summary["pass_on_stock_not_on_platform_without_teardown_errors"] = bodies
        print(f"\npass on stock, not on the platform: {len(lost)}")
        for test, outcome in lost.items():
            print(f"  {test}  ({outcome}) {platform.first_errors.get(test, '')}")
        if bodies != lost:
            print(f"not counting errors at teardown: {len(bodies)}")
            for test, outcome in bodies.items():
                print(f"  {test}  ({outcome})")
        teardown = sorted({m for m in platform.first_errors.values() if m.startswith("teardown")})
        if teardown:
            print("errors at teardown on the platform:")
            for message in teardown:
                print(f"  {message}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nsummary: {args.out}")
    return 1 if any(r.error for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
