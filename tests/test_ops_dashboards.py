"""The Grafana dashboard and the Prometheus rules: they load, follow the schema, name only
metrics the code exports, and each alert has a runbook."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from synth_workers import app
from synth_workers.metrics import CLUSTER_METRICS, ClusterCollector, metric_names

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "synth-workers.json"
RUNBOOKS = ROOT / "docs" / "operations.md"
METRIC = re.compile(r"\bsynth_[a-z0-9_]+\b")
DURATION = re.compile(r"^\d+[smhdwy]$")


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    return exprs


def test_alert_rules_load_and_follow_the_schema() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    assert isinstance(doc["groups"], list) and doc["groups"]
    names = []
    for group in doc["groups"]:
        assert group["name"] and isinstance(group["rules"], list)
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"Synth[A-Za-z]+", rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert rule["expr"].count("(") == rule["expr"].count(")")
            assert DURATION.match(rule["for"])
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])
            names.append(rule["alert"])
    assert len(names) == len(set(names))
    # the alerts are all there
    assert {
        "SynthJobFailureRateHigh",
        "SynthDLQGrowing",
        "SynthQueueBacklog",
        "SynthOldestJobTooOld",
        "SynthNoWorkersForQueue",
        "SynthBeatNotScheduling",
        "SynthLeaseExpiriesSpiking",
    } <= set(names)


def test_every_alert_has_a_runbook_entry() -> None:
    text = RUNBOOKS.read_text()
    headings = {m.group(1).strip().lower() for m in re.finditer(r"^### (.+)$", text, re.M)}
    for rule in _rules():
        anchor = rule["annotations"]["runbook_url"].split("#", 1)[1]
        assert anchor == rule["alert"].lower()
        assert anchor in headings, f"no runbook heading for {rule['alert']}"
        section = text.split(f"### {rule['alert']}", 1)[1].split("\n### ", 1)[0]
        for part in ("**Symptom.**", "**Diagnosis.**", "**Fixes.**"):
            assert part in section, (rule["alert"], part)


def test_every_metric_in_dashboard_and_rules_exists_in_the_code() -> None:
    known = metric_names()
    used: set[str] = set()
    for expr in [rule["expr"] for rule in _rules()] + _dashboard_exprs():
        used |= set(METRIC.findall(expr))
    assert used, "no metric names found"
    assert used <= known, sorted(used - known)
    # and the dashboard shows the issue's panels' metrics
    dashboard_used = {m for e in _dashboard_exprs() for m in METRIC.findall(e)}
    for name in (
        "synth_jobs_total",
        "synth_job_runtime_seconds_bucket",
        "synth_job_queue_wait_seconds_bucket",
        "synth_queue_depth",
        "synth_dlq_size",
        "synth_worker_up",
        "synth_llm_tokens_total",
        "synth_credits_charged_total",
    ):
        assert name in dashboard_used, name


def test_the_cluster_collector_exports_exactly_the_declared_gauges(rclient: Any) -> None:
    exported = {family.name for family in ClusterCollector(app).collect()}
    assert exported == set(CLUSTER_METRICS)


def test_dashboard_is_valid_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "synth-workers" and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert panel["type"] in ("timeseries", "stat")
        assert panel["datasource"]["uid"] == "${datasource}"
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "queue", "task"} <= variables


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    check = subprocess.run(
        ["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        ["promtool", "test", "rules", "alerts_test.yml"],
        cwd=ROOT / "tests" / "prometheus",
        capture_output=True,
        text=True,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
