"""The compose stack refers only to things that exist: commands, ports, settings, files.

No container engine runs in CI, so ``docker/compose.yaml`` (one server) and
``docker/compose.gpu.yaml`` (dedicated GPU server) are checked statically: every platform
service's command is a real ``celery -A synth_workers`` or ``synth-workers`` command with real
queues and options, every environment variable is one our settings read (or the named
third-party image's own), every port matches the command that listens on it, every mounted
file is in the repository, and Prometheus/Grafana config points at those services and files.

The ``PENDING_*`` lists name what other branches add (the interface contract of the
deployment issue); ``test_pending_lists_are_still_pending`` fails once one of them lands, so
the list is cleaned up right after the merge.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from synth_workers import routing
from synth_workers.cli import main as cli_main
from synth_workers.settings import Settings, env_name

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"

# Settings from the deployment contract that other branches add to settings.py (operations:
# health/metrics endpoints; events server). Delete each name once settings.py reads it.
PENDING_SETTINGS: frozenset[str] = frozenset()

# `synth-workers` commands from the contract, not yet in cli.py: path -> options they take.
PENDING_CLI_COMMANDS: dict[tuple[str, ...], frozenset[str]] = {}

# Files the operations branch writes, mounted or referenced here. Delete once merged.
PENDING_FILES: frozenset[str] = frozenset()

# Environment variables read by the processes themselves, not by our settings.
PROCESS_ENV: dict[str, str] = {
    "FLOWER_BASIC_AUTH": "Flower's own basic_auth option (user:password)",
}

# Environment variables of third-party images, by image name.
IMAGE_ENV: dict[str, frozenset[str]] = {
    "redis": frozenset({"REDISCLI_AUTH"}),
    "postgres": frozenset({"POSTGRES_USER", "POSTGRES_DB", "POSTGRES_PASSWORD"}),
    "grafana/grafana": frozenset(
        {
            "GF_SECURITY_ADMIN_USER",
            "GF_SECURITY_ADMIN_PASSWORD",
            "GF_USERS_ALLOW_SIGN_UP",
            "GF_AUTH_ANONYMOUS_ENABLED",
        }
    ),
}

# Health endpoints by process kind (the contract), and the port each listens on by default.
HEALTH = {
    "worker": ("/live", 9808),
    "flower": ("/healthcheck", Settings.model_fields["flower_port"].default),
    "events": ("/health", 8765),
    "metrics": ("/health", 9809),
}

_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::?([-?])([^}]*))?\}")


# --- the contract: settings and CLI ---------------------------------------------------------
def setting_names() -> frozenset[str]:
    """Every environment variable our settings read (aliases included)."""
    return frozenset(env_name(name) for name in Settings.model_fields)


def known_setting(name: str) -> bool:
    return name in setting_names() or name in PENDING_SETTINGS


def cli_command(path: tuple[str, ...]) -> click.Command | None:
    command: click.Command = cli_main
    for part in path:
        if not isinstance(command, click.Group) or part not in command.commands:
            return None
        command = command.commands[part]
    return command


def cli_options(path: tuple[str, ...]) -> frozenset[str] | None:
    """The options of ``synth-workers <path>``, or None when no such command (yet)."""
    command = cli_command(path)
    if command is not None:
        return frozenset(opt for param in command.params for opt in param.opts)
    return PENDING_CLI_COMMANDS.get(path)


def check_synth_workers_argv(argv: list[str]) -> dict[str, str]:
    """Assert ``synth-workers ...`` exists; return its ``--option value`` pairs."""
    assert argv[0] == "synth-workers"
    words = [a for a in argv[1:] if not a.startswith("-")]
    for size in range(len(words), 0, -1):
        path = tuple(words[:size])
        options = cli_options(path)
        if options is not None:
            break
    else:
        raise AssertionError(f"no such command: {shlex.join(argv)}")
    given = option_pairs(argv[1 + size :])
    unknown = set(given) - options
    assert not unknown, f"{shlex.join(argv)}: unknown options {sorted(unknown)}"
    return given


def option_pairs(args: list[str]) -> dict[str, str]:
    pairs: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            if "=" in arg:
                key, value = arg.split("=", 1)
                pairs[key] = value
            elif i + 1 < len(args) and not args[i + 1].startswith("-"):
                pairs[arg] = args[i + 1]
                i += 1
            else:
                pairs[arg] = ""
        i += 1
    return pairs


def check_celery_argv(argv: list[str]) -> tuple[str, dict[str, str]]:
    """Assert a real ``celery -A synth_workers <worker|beat|flower>``; return (kind, options)."""
    assert argv[:3] == ["celery", "-A", "synth_workers"], argv
    kind = argv[3]
    assert kind in ("worker", "beat", "flower"), argv
    options = option_pairs(argv[4:])
    if kind == "worker":
        queues = options["-Q"].split(",")
        assert set(queues) <= set(routing.QUEUES), f"unknown queues in {queues}"
        assert options["-P"] in ("prefork", "threads", "solo")
        assert int(options["-c"]) >= 1
        assert options["-n"].endswith("@%h"), "each worker needs a unique -n name@%h"
    return kind, options


def process_kind(argv: list[str]) -> str:
    if argv[0] == "celery":
        return check_celery_argv(argv)[0]
    if argv[:2] == ["synth-workers", "events"]:
        return "events"
    if argv[:2] == ["synth-workers", "metrics"]:
        return "metrics"
    return "other"


def repo_file_exists(rel: str) -> bool:
    return (ROOT / rel).exists() or rel in PENDING_FILES


# --- loading compose files ------------------------------------------------------------------
def interpolation_vars(text: str) -> set[str]:
    return {match.group(1) for match in _VAR.finditer(text)}


def _placeholder(match: re.Match[str]) -> str:
    """``${VAR:-default}`` gives its default, any other ``${VAR...}`` gives ``x<var>``."""
    name, operator, default = match.groups()
    return default if operator == "-" else f"x{name.lower()}"


def load_compose(name: str) -> dict[str, Any]:
    text = (DOCKER / name).read_text()
    # Interpolate as compose would, with placeholders for the values .env must give.
    return yaml.safe_load(_VAR.sub(_placeholder, text))


COMPOSE_FILES = ("compose.yaml", "compose.gpu.yaml")


@pytest.fixture(scope="module", params=COMPOSE_FILES)
def compose(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param, load_compose(request.param)


def is_ours(service: dict[str, Any]) -> bool:
    build = service.get("build") or {}
    return str(build.get("dockerfile", "")).startswith("docker/Dockerfile")


def image_name(service: dict[str, Any]) -> str:
    return str(service["image"]).rsplit(":", 1)[0]


def container_ports(service: dict[str, Any]) -> set[int]:
    ports = {int(p) for p in service.get("expose", [])}
    for mapping in service.get("ports", []):
        ports.add(int(str(mapping).rsplit(":", 1)[-1]))
    return ports


def healthcheck_url(service: dict[str, Any]) -> tuple[int, str] | None:
    test = (service.get("healthcheck") or {}).get("test")
    if not test:
        return None
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/[a-z]*)", " ".join(test))
    return (int(match.group(1)), match.group(2)) if match else None


# --- tests ----------------------------------------------------------------------------------
def test_every_interpolated_variable_is_documented_in_env_example() -> None:
    documented = {
        line.lstrip("# ").split("=", 1)[0]
        for line in (DOCKER / ".env.example").read_text().splitlines()
        if "=" in line
    }
    for name in COMPOSE_FILES:
        missing = interpolation_vars((DOCKER / name).read_text()) - documented
        assert not missing, f"{name}: document {sorted(missing)} in docker/.env.example"


def test_builds_and_images(compose: tuple[str, dict[str, Any]]) -> None:
    name, doc = compose
    for svc_name, svc in doc["services"].items():
        assert "image" in svc, f"{name}:{svc_name} has no image"
        if "build" in svc:
            context = (DOCKER / svc["build"]["context"]).resolve()
            assert context == ROOT, f"{name}:{svc_name}: build context must be the repository root"
            assert (context / svc["build"]["dockerfile"]).is_file()
        else:
            assert ":" in str(svc["image"]) and not str(svc["image"]).endswith(":latest"), (
                f"{name}:{svc_name}: pin third-party images to a version"
            )


def test_commands_exist(compose: tuple[str, dict[str, Any]]) -> None:
    name, doc = compose
    for svc_name, svc in doc["services"].items():
        if not is_ours(svc):
            continue
        argv = svc["command"]
        assert isinstance(argv, list), f"{name}:{svc_name}: use the exec form (a list)"
        if argv[0] == "celery":
            check_celery_argv(argv)
        else:
            check_synth_workers_argv(argv)


def test_environment_names_are_settings(compose: tuple[str, dict[str, Any]]) -> None:
    name, doc = compose
    for svc_name, svc in doc["services"].items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}:{svc_name}: use the mapping form"
        if is_ours(svc):
            unknown = {key for key in env if not known_setting(key) and key not in PROCESS_ENV}
            assert not unknown, f"{name}:{svc_name}: {sorted(unknown)} are not settings"
        else:
            allowed = IMAGE_ENV.get(image_name(svc), frozenset())
            unknown = set(env) - allowed
            assert not unknown, f"{name}:{svc_name}: {sorted(unknown)} unknown to its image"


def test_ports_match_what_listens(compose: tuple[str, dict[str, Any]]) -> None:
    name, doc = compose
    for svc_name, svc in doc["services"].items():
        if not is_ours(svc):
            continue
        argv = svc["command"]
        kind = process_kind(argv)
        env = svc.get("environment") or {}
        if kind == "worker":
            port = int(env["SYNTH_METRICS_PORT"])
            assert env["SYNTH_METRICS_ADDRESS"] == "0.0.0.0", "probes and Prometheus reach it"
        elif kind == "flower":
            options = option_pairs(argv[4:])
            port = int(options["--port"])
            assert options["--address"] == "0.0.0.0"
            user, password = env["FLOWER_BASIC_AUTH"].split(":")
            assert (user, password) == (env["SYNTH_FLOWER_USER"], env["SYNTH_FLOWER_PASSWORD"])
            assert password == "xsynth_flower_password", "Flower's password is required"
            assert int(env["SYNTH_FLOWER_PORT"]) == port
        elif kind in ("events", "metrics"):
            options = check_synth_workers_argv(argv)
            port = int(options["--port"])
            assert options["--address"] == "0.0.0.0"
        else:
            continue
        assert port == HEALTH[kind][1], f"{name}:{svc_name}: {kind} listens on {HEALTH[kind][1]}"
        assert port in container_ports(svc), f"{name}:{svc_name}: expose or publish {port}"
        check = healthcheck_url(svc)
        assert check == (port, HEALTH[kind][0]), f"{name}:{svc_name}: healthcheck {check}"


def test_mounted_files_exist(compose: tuple[str, dict[str, Any]]) -> None:
    name, doc = compose
    named_volumes = set((doc.get("volumes") or {}).keys())
    for svc_name, svc in doc["services"].items():
        for volume in svc.get("volumes", []):
            source = str(volume).split(":", 1)[0]
            if source.startswith("."):
                rel = (DOCKER / source).resolve().relative_to(ROOT).as_posix()
                assert repo_file_exists(rel), f"{name}:{svc_name}: {rel} is not in the repository"
            else:
                assert source in named_volumes, f"{name}:{svc_name}: volume {source} not declared"


def test_depends_on_real_services(compose: tuple[str, dict[str, Any]]) -> None:
    name, doc = compose
    for svc_name, svc in doc["services"].items():
        deps = svc.get("depends_on") or []
        for dep in deps:
            assert dep in doc["services"], f"{name}:{svc_name} depends on unknown {dep}"


def test_platform_containers_are_hardened(compose: tuple[str, dict[str, Any]]) -> None:
    name, doc = compose
    for svc_name, svc in doc["services"].items():
        if not is_ours(svc):
            continue
        assert svc["read_only"] is True, f"{name}:{svc_name}"
        assert "/tmp" in svc["tmpfs"], f"{name}:{svc_name}"
        assert svc["cap_drop"] == ["ALL"], f"{name}:{svc_name}"
        assert "no-new-privileges:true" in svc["security_opt"], f"{name}:{svc_name}"


def one_server() -> dict[str, Any]:
    return load_compose("compose.yaml")


def test_one_server_topology() -> None:
    services = one_server()["services"]
    redis = services["redis"]["command"]
    assert redis[redis.index("--appendonly") + 1] == "yes"
    assert redis[redis.index("--maxmemory-policy") + 1] == "noeviction"
    assert "--requirepass" in redis
    for svc in ("postgres", "qdrant", "prometheus", "grafana", "flower", "events", "metrics"):
        assert svc in services
    # One worker per pool: every queue but embeddings.gpu (the GPU server's) is consumed.
    consumed: list[str] = []
    for svc in services.values():
        if is_ours(svc) and svc["command"][3:4] == ["worker"]:
            consumed += option_pairs(svc["command"])["-Q"].split(",")
    assert sorted(consumed) == sorted(q for q in routing.QUEUES if q != routing.EMBEDDINGS_GPU)
    beat = services["beat"]
    assert check_celery_argv(beat["command"])[0] == "beat"
    assert beat["deploy"]["replicas"] == 2, "two beats show exactly-once periodic slots"
    # Migrations run before anything uses the ledger.
    assert services["migrate"]["command"] == ["synth-workers", "db", "migrate"]
    assert cli_command(("db", "migrate")) is not None
    for svc_name, svc in services.items():
        if is_ours(svc) and svc_name not in ("migrate", "flower"):  # Flower needs no ledger
            deps = svc.get("depends_on") or {}
            condition = deps.get("migrate", {}).get("condition")
            assert condition == "service_completed_successfully", svc_name
    # URLs point at the compose services.
    env = services["worker-email"]["environment"]
    assert "@redis:6379/" in env["REDIS_URL"]
    assert "@postgres:5432/" in env["DATABASE_URL"]
    assert env["QDRANT_URL"] == "http://qdrant:6333"


def test_gpu_server_topology() -> None:
    services = load_compose("compose.gpu.yaml")["services"]
    assert set(services) == {"worker-gpu", "qdrant"}
    gpu = services["worker-gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    _, options = check_celery_argv(gpu["command"])
    assert options["-Q"] == routing.EMBEDDINGS_GPU
    assert options["-P"] in ("threads", "solo"), "a non-forking pool loads the model once"
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # Redis and Postgres are the main server's.
    assert "@xmain_host:6379/" in gpu["environment"]["REDIS_URL"]
    assert "@xmain_host:5432/" in gpu["environment"]["DATABASE_URL"]


def test_prometheus_scrapes_workers_and_metrics_server_and_loads_alerts() -> None:
    services = one_server()["services"]
    prom_service = services["prometheus"]
    mounts = {
        target.split(":")[0]: source
        for source, target in (str(v).split(":", 1) for v in prom_service["volumes"])
    }
    config = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert rule_file in mounts, f"{rule_file} is not mounted into prometheus"
        rel = (DOCKER / mounts[rule_file]).resolve().relative_to(ROOT).as_posix()
        assert rel == "docker/prometheus/alerts.yml"
    targets: set[tuple[str, int]] = set()
    for job in config["scrape_configs"]:
        for dns in job.get("dns_sd_configs", []):
            targets |= {(n, int(dns["port"])) for n in dns["names"]}
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                targets.add((host, int(port)))
    targets.discard(("localhost", 9090))
    for host, port in targets:
        assert host in services, f"scrape target {host} is not a compose service"
        assert port in container_ports(services[host]), f"{host} does not expose {port}"
    workers = {n for n, s in services.items() if is_ours(s) and s["command"][3:4] == ["worker"]}
    assert {(w, 9808) for w in workers} <= targets, "every worker pool is scraped"
    assert ("metrics", 9809) in targets


def test_grafana_is_provisioned_with_the_dashboard() -> None:
    grafana = one_server()["services"]["grafana"]
    mounts = dict(str(v).split(":", 1) for v in grafana["volumes"])
    by_target = {target.removesuffix(":ro"): source for source, target in mounts.items()}
    prov = by_target["/etc/grafana/provisioning"]
    dash_dir = by_target["/var/lib/grafana/dashboards"]
    assert (DOCKER / dash_dir).resolve().relative_to(ROOT).as_posix() == (
        "docker/grafana/dashboards"
    )
    providers = yaml.safe_load((DOCKER / prov / "dashboards" / "synth-workers.yaml").read_text())[
        "providers"
    ]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"
    sources = yaml.safe_load((DOCKER / prov / "datasources" / "prometheus.yaml").read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    assert repo_file_exists("docker/grafana/dashboards/synth-workers.json")


def test_pending_lists_are_still_pending() -> None:
    """After a merge brings one of them, delete it from its PENDING list."""
    landed = sorted(name for name in PENDING_SETTINGS if name in setting_names())
    landed += [" ".join(p) for p in PENDING_CLI_COMMANDS if cli_command(p) is not None]
    landed += sorted(rel for rel in PENDING_FILES if (ROOT / rel).exists())
    assert not landed, f"now present, remove from the PENDING lists: {landed}"


def test_beat_healthcheck_reads_its_heartbeat() -> None:
    """Beat has a healthcheck that catches a hang: `synth-workers health beat` on the file
    its scheduler loop rewrites (SYNTH_BEAT_HEARTBEAT_FILE, under the writable /tmp)."""
    beat = one_server()["services"]["beat"]
    check = beat["healthcheck"]
    assert not check.get("disable")
    assert check["test"][0] == "CMD"
    assert check_synth_workers_argv(check["test"][1:]) == {}
    assert check["test"][1:] == ["synth-workers", "health", "beat"]
    heartbeat = beat["environment"]["SYNTH_BEAT_HEARTBEAT_FILE"]
    assert heartbeat.startswith("/tmp/") and "/tmp" in beat["tmpfs"]


def test_high_availability_settings_pass_through() -> None:
    """The read replica and Sentinel reach every platform process when set in the env file."""
    documented = (DOCKER / ".env.example").read_text()
    for name in COMPOSE_FILES:
        for svc_name, svc in load_compose(name)["services"].items():
            if not is_ours(svc):
                continue
            env = svc.get("environment") or {}
            assert "REDIS_SENTINEL_NAME" in env, f"{name}:{svc_name}"
            assert env["REDIS_SENTINEL_NAME"] in (None, ""), "passed through, not fixed"
            if name == "compose.yaml":
                assert "DATABASE_READ_URL" in env and env["DATABASE_READ_URL"] in (None, "")
    assert "# DATABASE_READ_URL=postgresql://" in documented
    assert "# REDIS_SENTINEL_NAME=" in documented
