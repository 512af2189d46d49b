"""The Helm chart renders with the real Helm engine, lints clean, and every manifest is valid.

``helm-python-sdk`` (the Helm Go SDK, offline) renders ``helm/synth-workers`` for the
default values and for the value sets below; ``kubernetes-validate`` checks every core
manifest against the Kubernetes 1.30 schemas in strict mode (no unknown field). KEDA and
Prometheus Operator objects have no schema there: they are checked against the subset of
their CRD schemas the chart uses (``CRD_SCHEMAS``, unknown fields refused).

Then the properties the deployment promises: restricted Pod Security, probes on our HTTP
health endpoints, grace periods covering the longest task, and KEDA triggers on *every*
priority sub-list of a pool's queues, computed with kombu's own naming.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest
import yaml
from kombu.transport.redis import Channel

from synth_workers.app import celery_config
from synth_workers.settings import Settings
from tests.test_deploy_compose import (
    HEALTH,
    check_celery_argv,
    check_synth_workers_argv,
    known_setting,
)

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "synth-workers"
KUBE_VERSION = "1.30"
RELEASE = "jobs"
NAMESPACE = "synth"
FULLNAME = f"{RELEASE}-synth-workers"

DEFAULTS: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())


def _gpu_pools() -> list[dict[str, Any]]:
    pools = copy.deepcopy(DEFAULTS["pools"])
    for pool in pools:
        if pool["name"] == "gpu":
            pool["enabled"] = True
            pool["nodeSelector"] = {"nvidia.com/gpu.present": "true"}
    return pools


VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "keda-redis": {
        "keda": {"enabled": True, "redis": {"address": "redis-master.redis:6379"}},
        "secret": {"data": {"REDIS_URL": "redis://:pw@redis-master.redis:6379/0"}},
    },
    "keda-prometheus": {
        "keda": {"enabled": True, "trigger": "prometheus"},
        "prometheusOperator": {"enabled": True},
    },
    "keda-off-hpa": {"keda": {"enabled": False}, "migrations": {"enabled": False}},
    "gpu-existing-secret": {
        "pools": _gpu_pools(),
        "keda": {"enabled": True},
        "secret": {"existingSecret": "synth-env"},
        "flower": {
            "auth": {"existingSecret": "flower-auth"},
            "ingress": {"enabled": True, "className": "nginx", "host": "flower.example.com"},
        },
        "prometheusOperator": {"enabled": True},
        "networkPolicy": {
            "egress": [{"to": [{"namespaceSelector": {}}]}],
            "eventsFrom": [{"podSelector": {"matchLabels": {"app": "frontend"}}}],
        },
    },
    # High availability and TLS: Sentinel (REDIS_URL lists the sentinels), a read replica,
    # certificates from a Secret mounted in every platform container.
    "ha-tls": {
        "config": {"REDIS_SENTINEL_NAME": "synth"},
        "secret": {
            "data": {
                "REDIS_URL": "rediss://:pw@sentinel-0.sentinel:26379,sentinel-1.sentinel:26379,"
                "sentinel-2.sentinel:26379/0?ssl_ca_certs=/etc/synth-workers/tls/ca.crt",
                "DATABASE_URL": "postgresql://synth:pw@pg-primary:5432/synth?sslmode=verify-full"
                "&sslrootcert=/etc/synth-workers/tls/ca.crt",
                "DATABASE_READ_URL": "postgresql://synth:pw@pg-replica:5432/synth?"
                "sslmode=verify-full&sslrootcert=/etc/synth-workers/tls/ca.crt",
            }
        },
        "tls": {"existingSecret": "synth-tls"},
    },
}


def merged(values: dict[str, Any]) -> dict[str, Any]:
    """The values Helm sees: defaults with ``values`` merged in (lists replaced)."""
    result = copy.deepcopy(DEFAULTS)

    def merge(into: dict[str, Any], update: dict[str, Any]) -> None:
        for key, value in update.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = copy.deepcopy(value)

    merge(result, values)
    return result


@pytest.fixture(scope="module")
def chart() -> helm_python.Chart:
    return helm_python.Chart.load(str(CHART))


def render(chart: helm_python.Chart, values: dict[str, Any]) -> list[dict[str, Any]]:
    out = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    docs: list[dict[str, Any]] = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            assert text.strip(), "NOTES.txt renders"
            continue
        docs += [doc for doc in yaml.safe_load_all(text) if doc]
    return docs


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def rendered(
    request: pytest.FixtureRequest, chart: helm_python.Chart
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    values = VALUE_SETS[request.param]
    return merged(values), render(chart, values)


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (doc["metadata"]["name"], doc["spec"]["template"]["spec"])
        for doc in docs
        if doc["kind"] in ("Deployment", "Job")
    ]


def worker_deployments(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    prefix = f"{FULLNAME}-worker-"
    return {
        doc["metadata"]["name"].removeprefix(prefix): doc
        for doc in of_kind(docs, "Deployment")
        if doc["metadata"]["name"].startswith(prefix)
    }


# --- CRD subsets (keda.sh/v1alpha1, monitoring.coreos.com/v1) ---------------------------------
def _obj(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(required),
        "additionalProperties": False,
    }


_STR = {"type": "string"}
_INT = {"type": "integer"}
_STRMAP = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}},
}


def _crd(api: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _obj(
        {"apiVersion": {"const": api}, "kind": {"const": kind}, "metadata": _META, "spec": spec},
        ("apiVersion", "kind", "metadata", "spec"),
    )


CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ScaledObject": _crd(
        "keda.sh/v1alpha1",
        "ScaledObject",
        _obj(
            {
                "scaleTargetRef": _obj({"name": _STR, "kind": _STR, "apiVersion": _STR}, ("name",)),
                "pollingInterval": _INT,
                "cooldownPeriod": _INT,
                "minReplicaCount": _INT,
                "maxReplicaCount": _INT,
                "idleReplicaCount": _INT,
                "fallback": _obj(
                    {"failureThreshold": _INT, "replicas": _INT},
                    ("failureThreshold", "replicas"),
                ),
                "advanced": {"type": "object"},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _obj(
                        {
                            "type": {"enum": ["redis", "prometheus"]},
                            "name": {"type": "string", "pattern": "^[a-z0-9-]+$"},
                            "metadata": _STRMAP,
                            "authenticationRef": _obj({"name": _STR, "kind": _STR}, ("name",)),
                            "metricType": _STR,
                            "useCachedMetrics": {"type": "boolean"},
                        },
                        ("type", "metadata"),
                    ),
                },
            },
            ("scaleTargetRef", "triggers"),
        ),
    ),
    "TriggerAuthentication": _crd(
        "keda.sh/v1alpha1",
        "TriggerAuthentication",
        _obj(
            {
                "secretTargetRef": {
                    "type": "array",
                    "items": _obj(
                        {"parameter": _STR, "name": _STR, "key": _STR},
                        ("parameter", "name", "key"),
                    ),
                }
            }
        ),
    ),
    "ServiceMonitor": _crd(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        _obj(
            {
                "selector": {"type": "object"},
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "items": _obj(
                        {"port": _STR, "path": _STR, "interval": _STR, "scrapeTimeout": _STR},
                        ("port",),
                    ),
                },
            },
            ("selector", "endpoints"),
        ),
    ),
    "PrometheusRule": _crd(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        _obj(
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": _obj(
                        {
                            "name": _STR,
                            "interval": _STR,
                            "rules": {
                                "type": "array",
                                "items": _obj(
                                    {
                                        "alert": _STR,
                                        "record": _STR,
                                        "expr": {"type": ["string", "integer"]},
                                        "for": _STR,
                                        "keep_firing_for": _STR,
                                        "labels": _STRMAP,
                                        "annotations": _STRMAP,
                                    },
                                    ("expr",),
                                ),
                            },
                        },
                        ("name", "rules"),
                    ),
                }
            },
            ("groups",),
        ),
    ),
}


# --- render, lint, validate ---------------------------------------------------------------
@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_lint_is_clean(name: str) -> None:
    report = helm_python.lint(str(CHART), VALUE_SETS[name], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_every_manifest_is_valid(rendered: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    _values, docs = rendered
    assert docs
    for doc in docs:
        if doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_names_are_unique(rendered: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    _values, docs = rendered
    keys = [(doc["kind"], doc["metadata"]["name"]) for doc in docs]
    assert len(keys) == len(set(keys))


def test_schema_refuses_bad_values(chart: helm_python.Chart) -> None:
    bad_values = [
        {
            "pools": [
                {
                    "name": "x",
                    "queues": [],
                    "pool": "prefork",
                    "concurrency": 1,
                    "longestTaskSeconds": 1,
                }
            ]
        },
        {
            "pools": [
                {
                    "name": "x",
                    "queues": ["email"],
                    "pool": "eventlet",
                    "concurrency": 1,
                    "longestTaskSeconds": 1,
                }
            ]
        },
        {"keda": {"trigger": "cpu"}},
        {"keda": {"redis": {"address": "redis://:secret@redis:6379"}}},
        {"config": {"lower_case": "x"}},
    ]
    for values in bad_values:
        with pytest.raises(helm_python.HelmError):
            chart.render(values=values, name=RELEASE, namespace=NAMESPACE)


# --- security -------------------------------------------------------------------------------
def test_restricted_pod_security(rendered: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    _values, docs = rendered
    specs = pod_specs(docs)
    assert specs
    for name, spec in specs:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["runAsUser"] != 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for container in spec["containers"] + spec.get("initContainers", []):
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["capabilities"]["drop"] == ["ALL"], name
            assert not ctx["capabilities"].get("add"), name
            assert ctx.get("privileged") in (None, False), name
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{name}: /tmp emptyDir"


def test_network_policy(rendered: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, docs = rendered
    (policy,) = of_kind(docs, "NetworkPolicy")
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {
        values["health"]["port"],
        values["metricsServer"]["port"],
        values["flower"]["port"],
        values["events"]["port"],
    }
    assert ("Egress" in policy["spec"]["policyTypes"]) == bool(values["networkPolicy"]["egress"])


# --- probes and grace periods -----------------------------------------------------------------
def _http(probe: dict[str, Any], container: dict[str, Any]) -> tuple[str, int]:
    port = probe["httpGet"]["port"]
    if isinstance(port, str):
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
    return probe["httpGet"]["path"], port


def test_probes_on_health_endpoints(
    rendered: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    _values, docs = rendered
    seen: set[str] = set()
    for doc in of_kind(docs, "Deployment"):
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        text = yaml.safe_dump(container)
        assert "inspect" not in text, "no `celery inspect ping` probes"
        kind = container["name"]
        if kind == "beat":
            # no HTTP endpoint: an exec probe reads the heartbeat its scheduler loop writes
            for probe in ("startupProbe", "livenessProbe"):
                argv = container[probe]["exec"]["command"]
                assert argv == ["synth-workers", "health", "beat"], (probe, argv)
                assert check_synth_workers_argv(argv) == {}
            seen.add(kind)
            continue
        assert "exec" not in text, "HTTP probes on the health endpoints"
        seen.add(kind)
        path, port = HEALTH[kind]
        expected = {
            "startupProbe": "/live" if kind == "worker" else path,
            "livenessProbe": "/live" if kind == "worker" else path,
            "readinessProbe": "/ready" if kind == "worker" else path,
        }
        for probe, want in expected.items():
            assert _http(container[probe], container) == (want, port), (doc["metadata"], probe)
    assert {"worker", "flower", "events", "metrics", "beat"} <= seen


def test_grace_period_covers_longest_task(
    rendered: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    values, docs = rendered
    deployments = worker_deployments(docs)
    pools = [p for p in values["pools"] if p["enabled"]]
    assert set(deployments) == {p["name"] for p in pools}
    for pool in pools:
        spec = deployments[pool["name"]]["spec"]
        grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= pool["longestTaskSeconds"] + values["softShutdownSeconds"]
        # Rolling update never drops below the wanted count; old pods drain warmly.
        assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


# --- workers --------------------------------------------------------------------------------
def test_worker_commands_and_settings(
    rendered: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    values, docs = rendered
    deployments = worker_deployments(docs)
    for pool in (p for p in values["pools"] if p["enabled"]):
        spec = deployments[pool["name"]]["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        _, options = check_celery_argv(container["command"] + container["args"])
        assert options["-Q"].split(",") == pool["queues"]
        assert options["-P"] == pool["pool"]
        assert int(options["-c"]) == pool["concurrency"]
        autoscaled = pool["autoscaling"]["enabled"]
        assert ("replicas" in deployments[pool["name"]]["spec"]) == (not autoscaled)
        if pool.get("gpu"):
            assert container["image"].startswith(values["gpuImage"]["repository"] + ":")
            assert container["resources"]["limits"]["nvidia.com/gpu"] == pool.get("gpuCount", 1)
            assert spec["tolerations"] == pool["tolerations"]
            assert spec["nodeSelector"] == pool["nodeSelector"]
        else:
            assert container["image"].startswith(values["image"]["repository"] + ":")
            assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    (config,) = of_kind(docs, "ConfigMap")
    for key in config["data"]:
        assert known_setting(key), f"ConfigMap key {key} is not a setting"
    assert config["data"]["SYNTH_METRICS_ADDRESS"] == "0.0.0.0"


def test_beat_runs_twice(rendered: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    _values, docs = rendered
    (beat,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-beat")]
    assert beat["spec"]["replicas"] == 2
    (container,) = beat["spec"]["template"]["spec"]["containers"]
    assert check_celery_argv(container["command"] + container["args"])[0] == "beat"


def test_secrets(rendered: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, docs = rendered
    secrets = {d["metadata"]["name"]: d for d in of_kind(docs, "Secret")}
    existing = values["secret"]["existingSecret"]
    secret_name = existing or FULLNAME
    assert (FULLNAME in secrets) == (not existing)
    flower_secret = values["flower"]["auth"]["existingSecret"] or f"{FULLNAME}-flower-auth"
    assert (f"{FULLNAME}-flower-auth" in secrets) == (
        not values["flower"]["auth"]["existingSecret"]
    )
    for name, spec in pod_specs(docs):
        (container,) = spec["containers"]
        refs = [e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e]
        assert secret_name in refs, name
        if name.endswith("-flower"):
            assert flower_secret in refs
    if not existing:
        data = secrets[FULLNAME]["stringData"]
        assert data["JWT_SECRET"], "generated when not given"
        for key in data:
            assert known_setting(key) or key == "REDIS_PASSWORD", key
    if not values["flower"]["auth"]["existingSecret"]:
        auth = secrets[f"{FULLNAME}-flower-auth"]["stringData"]
        assert (
            auth["FLOWER_BASIC_AUTH"]
            == f"{auth['SYNTH_FLOWER_USER']}:{auth['SYNTH_FLOWER_PASSWORD']}"
        )


# --- autoscaling ----------------------------------------------------------------------------
def priority_lists(queue: str) -> set[str]:
    """The Redis lists kombu uses for ``queue`` with our transport options."""
    options = celery_config(Settings())["broker_transport_options"]
    assert options["queue_order_strategy"] == "priority"

    class _Channel:
        sep = Channel.sep
        priority_steps = options["priority_steps"]
        priority = Channel.priority
        q_for_pri = Channel._q_for_pri

    channel = _Channel()
    return {channel.q_for_pri(queue, step) for step in options["priority_steps"]}


def test_priority_lists_match_the_contract() -> None:
    assert priority_lists("email") == {"email"} | {f"email\x06\x16{n}" for n in range(1, 10)}


def test_autoscaling(rendered: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, docs = rendered
    scaled = {p["name"]: p for p in values["pools"] if p["enabled"] and p["autoscaling"]["enabled"]}
    objects = {d["spec"]["scaleTargetRef"]["name"]: d for d in of_kind(docs, "ScaledObject")}
    hpas = {
        d["spec"]["scaleTargetRef"]["name"]: d for d in of_kind(docs, "HorizontalPodAutoscaler")
    }
    targets = {f"{FULLNAME}-worker-{name}" for name in scaled}
    keda = values["keda"]
    if not keda["enabled"]:
        assert not objects and set(hpas) == targets
        for name, pool in scaled.items():
            hpa = hpas[f"{FULLNAME}-worker-{name}"]["spec"]
            assert hpa["minReplicas"] == pool["autoscaling"]["minReplicas"]
            assert hpa["maxReplicas"] == pool["autoscaling"]["maxReplicas"]
        return
    assert not hpas and set(objects) == targets
    auths = of_kind(docs, "TriggerAuthentication")
    for name, pool in scaled.items():
        spec = objects[f"{FULLNAME}-worker-{name}"]["spec"]
        assert spec["minReplicaCount"] >= 1, "a worker's sweeper must keep running"
        assert spec["fallback"]["replicas"] >= 1
        triggers = spec["triggers"]
        if keda["trigger"] == "redis":
            want = set().union(*(priority_lists(q) for q in pool["queues"]))
            got = [t["metadata"]["listName"] for t in triggers]
            assert sorted(got) == sorted(want), f"{name}: every priority sub-list, once"
            for trigger in triggers:
                meta = trigger["metadata"]
                assert trigger["type"] == "redis"
                assert "@" not in meta["address"] and "password" not in meta
                assert meta["listLength"] == str(pool["autoscaling"]["listLength"])
                assert trigger["authenticationRef"]["name"] == auths[0]["metadata"]["name"]
        else:
            (trigger,) = triggers
            assert trigger["type"] == "prometheus"
            query = trigger["metadata"]["query"]
            assert query.startswith("sum(synth_queue_depth{queue=~")
            for queue in pool["queues"]:
                assert queue.replace(".", "[.]") in query
            assert "priority" not in query, "every priority counts"
    if keda["trigger"] == "redis":
        (auth,) = auths
        (ref,) = auth["spec"]["secretTargetRef"]
        assert ref["parameter"] == "password"
        assert ref["name"] == (values["secret"]["existingSecret"] or FULLNAME)
        assert ref["key"] == keda["redis"]["passwordKey"]


def test_disruption_budgets(rendered: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, docs = rendered
    budgets = {d["metadata"]["name"]: d["spec"] for d in of_kind(docs, "PodDisruptionBudget")}
    for pool in (p for p in values["pools"] if p["enabled"]):
        assert budgets[f"{FULLNAME}-worker-{pool['name']}"]["maxUnavailable"] == 1
    assert budgets[f"{FULLNAME}-beat"]["minAvailable"] == 1


# --- migrations, monitoring -------------------------------------------------------------------
def test_migrations_job(rendered: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    values, docs = rendered
    jobs = of_kind(docs, "Job")
    if not values["migrations"]["enabled"]:
        assert not jobs
        return
    (job,) = jobs
    hooks = job["metadata"]["annotations"]["helm.sh/hook"].split(",")
    assert set(hooks) == {"pre-install", "pre-upgrade"}
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] + container["args"] == ["synth-workers", "db", "migrate"]
    # What the Job reads exists before it: hook resources with a lower weight.
    weight = int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    for doc in of_kind(docs, "ConfigMap") + of_kind(docs, "Secret"):
        if doc["metadata"]["name"] in (FULLNAME, f"{FULLNAME}-config"):
            annotations = doc["metadata"]["annotations"]
            assert int(annotations["helm.sh/hook-weight"]) < weight
            assert "pre-install" in annotations["helm.sh/hook"]


def test_prometheus_operator_objects(
    rendered: tuple[dict[str, Any], list[dict[str, Any]]],
) -> None:
    values, docs = rendered
    monitors = of_kind(docs, "ServiceMonitor")
    rules = of_kind(docs, "PrometheusRule")
    if not values["prometheusOperator"]["enabled"]:
        assert not monitors and not rules
        return
    (monitor,) = monitors
    selector = monitor["spec"]["selector"]["matchLabels"]
    scraped = [
        s
        for s in of_kind(docs, "Service")
        if all(s["metadata"]["labels"].get(k) == v for k, v in selector.items())
    ]
    assert {s["metadata"]["name"] for s in scraped} == {
        f"{FULLNAME}-workers",
        f"{FULLNAME}-metrics",
    }
    for service in scraped:
        assert monitor["spec"]["endpoints"][0]["port"] in {
            p["name"] for p in service["spec"]["ports"]
        }
    (rule,) = rules
    alerts = yaml.safe_load((CHART / "files" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]


def test_chart_alert_rules_match_the_compose_ones() -> None:
    """After the operations branch is merged, the chart's copy must equal its file."""
    source = ROOT / "docker" / "prometheus" / "alerts.yml"
    chart_copy = CHART / "files" / "alerts.yml"
    if not source.exists():
        from tests.test_deploy_compose import PENDING_FILES

        assert "docker/prometheus/alerts.yml" in PENDING_FILES
        return
    assert yaml.safe_load(chart_copy.read_text()) == yaml.safe_load(source.read_text()), (
        "copy docker/prometheus/alerts.yml to helm/synth-workers/files/alerts.yml"
    )


def test_chart_readme_lists_every_top_level_value() -> None:
    readme = (CHART / "README.md").read_text()
    for key in DEFAULTS:
        assert f"`{key}" in readme, f"README values table misses {key}"


# --- liveness of beat, high availability, TLS ------------------------------------------------
def test_beat_probe_window(rendered: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    """Beat's heartbeat file is under the writable /tmp, named in the ConfigMap, and a hung
    beat is restarted within two heartbeat intervals plus the probe's failure window."""
    values, docs = rendered
    (config,) = of_kind(docs, "ConfigMap")
    heartbeat = config["data"]["SYNTH_BEAT_HEARTBEAT_FILE"]
    assert heartbeat == values["beat"]["heartbeatFile"] and heartbeat.startswith("/tmp/")
    (beat,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"].endswith("-beat")]
    (container,) = beat["spec"]["template"]["spec"]["containers"]
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    live = container["livenessProbe"]
    window = 2 * float(config["data"]["SYNTH_HEALTH_INTERVAL"])
    window += live["periodSeconds"] * live["failureThreshold"]
    assert window <= 120, window
    assert live["timeoutSeconds"] >= 5, "the probe starts a Python process"


def test_high_availability_and_tls(rendered: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    """DATABASE_READ_URL and the Sentinel name reach every platform container through the
    Secret and ConfigMap; tls.existingSecret is mounted read-only in every one of them."""
    values, docs = rendered
    (config,) = of_kind(docs, "ConfigMap")
    sentinel = values["config"].get("REDIS_SENTINEL_NAME")
    assert config["data"].get("REDIS_SENTINEL_NAME") == (sentinel or None)
    if not values["secret"]["existingSecret"]:
        (secret,) = [d for d in of_kind(docs, "Secret") if d["metadata"]["name"] == FULLNAME]
        data = secret["stringData"]
        read_url = values["secret"]["data"].get("DATABASE_READ_URL")
        assert data.get("DATABASE_READ_URL") == (read_url or None)
    tls = values["tls"]
    for name, spec in pod_specs(docs):
        (container,) = spec["containers"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        if not tls["existingSecret"]:
            assert "tls" not in mounts and "tls" not in volumes, name
            continue
        assert mounts["tls"] == {"name": "tls", "mountPath": tls["mountPath"], "readOnly": True}
        assert volumes["tls"]["secret"]["secretName"] == tls["existingSecret"], name
        assert volumes["tls"]["secret"]["defaultMode"] == 0o440, name
    if tls["existingSecret"]:
        for key in ("REDIS_URL", "DATABASE_URL", "DATABASE_READ_URL"):
            url = values["secret"]["data"][key]
            assert tls["mountPath"] + "/ca.crt" in url, key
        assert values["secret"]["data"]["REDIS_URL"].startswith("rediss://")
