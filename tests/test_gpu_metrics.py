"""GPU metrics (synth_workers.gpu): no series and no error without a GPU, tested against the
real nvidia-ml-py with no driver and with the library hidden; the series a GPU gives, from a
test double of NVML (tests/fake_nvml), in process and on a real worker's /metrics; and the
dashboard panels and alert that read them."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from synth_workers import enqueue
from synth_workers.gpu import GPU_METRICS, GpuCollector, visible_entries
from synth_workers.metrics import metric_names

from .conftest import ROOT, wait_until
from .test_ops_metrics import free_port, get, samples

FAKE_NVML = ROOT / "tests" / "fake_nvml"
NO_NVML = ROOT / "tests" / "no_nvml"
GIB = 1024**3
H200 = {"gpu": "0", "name": "NVIDIA H200"}
L4 = {"gpu": "1", "name": "NVIDIA L4"}


def fake_nvml() -> Any:
    """A fresh copy of the NVML double (its globals shape one test's machine)."""
    name = f"fake_pynvml_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, FAKE_NVML / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scrape(collector: GpuCollector) -> tuple[CollectorRegistry, str]:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry, generate_latest(registry).decode()


def gpu_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "synth_workers.gpu" and r.levelno >= logging.WARNING
    ]


@pytest.fixture(autouse=True)
def _all_devices_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


# --- no GPU: the real library --------------------------------------------------------------


def test_no_driver_no_series_and_no_error_with_the_real_library(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import pynvml  # the real nvidia-ml-py (the gpu extra, in dev)

    assert Path(pynvml.__file__).parent.parent != ROOT / "tests", pynvml.__file__
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        refused = exc
    else:
        pynvml.nvmlShutdown()
        pytest.skip("an NVIDIA driver is loaded here: test_a_real_gpu_gives_its_series covers it")
    caplog.set_level(logging.DEBUG, logger="synth_workers.gpu")
    collector = GpuCollector()
    for _ in range(3):  # every scrape, not just the first
        _, text = scrape(collector)
        assert "synth_gpu" not in text
    assert collector.devices == []
    assert collector.reason is not None and "NVML did not start" in collector.reason
    assert str(refused) in collector.reason
    assert gpu_warnings(caplog) == []
    collector.close()  # nothing was started: nothing to shut down, no error


def test_library_absent_no_series_and_no_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    caplog.set_level(logging.DEBUG, logger="synth_workers.gpu")
    collector = GpuCollector()
    _, text = scrape(collector)
    assert "synth_gpu" not in text
    assert collector.reason is not None and "nvidia-ml-py is not installed" in collector.reason
    assert gpu_warnings(caplog) == []


def test_a_real_gpu_gives_its_series() -> None:
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        pytest.skip(f"no NVIDIA driver on this machine ({exc}): the no-GPU tests cover it")
    count = pynvml.nvmlDeviceGetCount()
    pynvml.nvmlShutdown()
    registry, _ = scrape(collector := GpuCollector())
    assert len(collector.devices) == count > 0
    for device in collector.devices:
        labels = {"gpu": str(device.index), "name": device.name}
        total = registry.get_sample_value("synth_gpu_memory_total_bytes", labels)
        used = registry.get_sample_value("synth_gpu_memory_used_bytes", labels)
        assert total is not None and used is not None and 0 <= used <= total
        util = registry.get_sample_value("synth_gpu_utilization_ratio", labels)
        assert util is not None and 0 <= util <= 1
    collector.close()


# --- with a GPU: the NVML double -----------------------------------------------------------


def test_series_per_device_from_nvml() -> None:
    nvml = fake_nvml()
    collector = GpuCollector(nvml=nvml)
    registry, text = scrape(collector)
    value = registry.get_sample_value
    assert value("synth_gpu_utilization_ratio", H200) == pytest.approx(0.37)
    assert value("synth_gpu_utilization_ratio", L4) == 1.0
    assert value("synth_gpu_memory_used_bytes", H200) == 5 * GIB
    assert value("synth_gpu_memory_total_bytes", H200) == 141 * GIB
    assert value("synth_gpu_memory_used_bytes", L4) == 22 * GIB  # a bytes name is decoded
    assert value("synth_gpu_memory_total_bytes", L4) == 24 * GIB
    assert value("synth_gpu_temperature_celsius", H200) == 41
    assert value("synth_gpu_temperature_celsius", L4) == 78
    exported = {m.group(1) for m in re.finditer(r"^(synth_\w+)\{", text, re.M)}
    assert exported == set(GPU_METRICS)
    # readings are taken at each scrape; NVML is started once
    nvml.DEVICES[0]["used"] = 6 * GIB
    nvml.DEVICES[0]["gpu"] = 5
    registry, _ = scrape(collector)
    assert registry.get_sample_value("synth_gpu_memory_used_bytes", H200) == 6 * GIB
    assert registry.get_sample_value("synth_gpu_utilization_ratio", H200) == pytest.approx(0.05)
    assert nvml.calls == {"init": 1, "shutdown": 0}
    collector.close()
    assert nvml.calls == {"init": 1, "shutdown": 1}
    _, text = scrape(collector)
    assert "synth_gpu" not in text


def test_a_reading_a_device_cannot_give_is_left_out_alone() -> None:
    nvml = fake_nvml()
    nvml.DEVICES[1]["temperature"] = -nvml.NVML_ERROR_NOT_SUPPORTED
    nvml.DEVICES[0]["used"] = -nvml.NVML_ERROR_GPU_IS_LOST
    registry, _ = scrape(GpuCollector(nvml=nvml))
    value = registry.get_sample_value
    assert value("synth_gpu_temperature_celsius", L4) is None
    assert value("synth_gpu_temperature_celsius", H200) == 41
    assert value("synth_gpu_memory_used_bytes", H200) is None
    assert value("synth_gpu_memory_total_bytes", H200) is None
    assert value("synth_gpu_memory_used_bytes", L4) == 22 * GIB
    assert value("synth_gpu_utilization_ratio", H200) == pytest.approx(0.37)


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        ("1", ["1"]),
        ("GPU-0a1b2c3d", ["0"]),  # a UUID prefix, as CUDA takes it
        ("1,0", ["0", "1"]),
        ("0,bogus,1", ["0"]),  # CUDA stops at the first entry it cannot read
        ("", []),
        ("-1", []),
    ],
)
def test_cuda_visible_devices_limits_the_devices(visible: str, expected: list[str]) -> None:
    nvml = fake_nvml()
    collector = GpuCollector(nvml=nvml, visible=visible)
    registry, text = scrape(collector)
    found = sorted(str(d.index) for d in collector.devices)
    assert found == expected
    for index, labels in (("0", H200), ("1", L4)):
        got = registry.get_sample_value("synth_gpu_memory_total_bytes", labels)
        assert (got is not None) == (index in expected)
    if not expected:
        assert "synth_gpu" not in text
        assert collector.reason is not None and "CUDA_VISIBLE_DEVICES" in collector.reason
        assert nvml.calls == {"init": 1, "shutdown": 1}  # started, found nothing, shut down


def test_visible_entries_read_as_cuda_reads_them() -> None:
    assert visible_entries(None) is None
    assert visible_entries(" 2 , GPU-ab ,x,3") == ["2", "GPU-ab"]
    assert visible_entries("") == []


@pytest.mark.parametrize(
    ("error", "warned"),
    [("NVML_ERROR_LIBRARY_NOT_FOUND", False), ("NVML_ERROR_DRIVER_NOT_LOADED", False),
     ("NVML_ERROR_NO_PERMISSION", True)],
)  # fmt: skip
def test_nvml_refusing_to_start_gives_no_series_and_warns_only_if_a_driver_is_there(
    error: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    nvml = fake_nvml()
    nvml.INIT_ERROR = getattr(nvml, error)
    caplog.set_level(logging.DEBUG, logger="synth_workers.gpu")
    collector = GpuCollector(nvml=nvml)
    _, text = scrape(collector)
    assert "synth_gpu" not in text
    assert collector.reason is not None and error in collector.reason
    warnings = gpu_warnings(caplog)
    assert bool(warnings) is warned, warnings
    scrape(collector)
    assert nvml.calls["init"] == 1  # not retried on every scrape


# --- on a real worker's /metrics -----------------------------------------------------------


@pytest.mark.parametrize("machine", ["no-driver", "no-library", "two-gpus", "two-gpus-off"])
def test_worker_metrics_endpoint(
    machine: str, rclient: Any, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real worker: its /metrics has GPU series exactly when NVML shows a GPU, and the
    worker runs jobs and logs no error either way; ``SYNTH_GPU_METRICS=false`` turns them off."""
    path = {"no-library": NO_NVML, "two-gpus": FAKE_NVML, "two-gpus-off": FAKE_NVML}.get(machine)
    env = {"SYNTH_METRICS_PORT": str(port := free_port())}
    if machine == "two-gpus-off":
        env["SYNTH_GPU_METRICS"] = "false"
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")]))
    worker = start_worker("gpu-metrics", env=env)
    done = enqueue("tests.e2e_tasks.record", {"label": machine}, queue="gpu-metrics")
    assert done.wait(timeout=60) is not None
    assert wait_until(lambda: get(f"http://127.0.0.1:{port}/metrics")[0] == 200, timeout=10)
    found = samples(port)
    assert found[("synth_worker_up", ())] == 1
    gpu = {key: v for key, v in found.items() if key[0].startswith("synth_gpu_")}
    if machine == "two-gpus":
        labels = tuple(sorted(L4.items()))
        assert gpu[("synth_gpu_memory_used_bytes", labels)] == 22 * GIB
        assert gpu[("synth_gpu_temperature_celsius", tuple(sorted(H200.items())))] == 41
        assert len(gpu) == 8  # 4 series x 2 devices
    else:
        assert gpu == {}
        _, body = get(f"http://127.0.0.1:{port}/metrics")
        assert b"synth_gpu" not in body
    assert worker.stop() == 0
    log = worker.output()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    assert not re.search(r"WARNING.*(GPU|NVML)", log), log[-3000:]
    if machine == "two-gpus":
        assert "GPU metrics for 2 device(s): 0: NVIDIA H200, 1: NVIDIA L4" in log


# --- dashboard and alert -------------------------------------------------------------------


def test_dashboard_shows_the_gpu_series() -> None:
    dash = json.loads((ROOT / "docker/grafana/dashboards/synth-workers.json").read_text())
    gpu_panels = [p for p in dash["panels"] if any("synth_gpu_" in t["expr"] for t in p["targets"])]
    exprs = [t["expr"] for p in gpu_panels for t in p["targets"]]
    shown = {m for expr in exprs for m in re.findall(r"synth_gpu_\w+", expr)}
    assert shown == set(GPU_METRICS)
    assert set(GPU_METRICS) <= metric_names()
    units = {p["fieldConfig"]["defaults"].get("unit") for p in gpu_panels}
    assert {"percentunit", "bytes", "celsius"} <= units


def test_gpu_memory_alert_is_declared() -> None:
    doc = yaml.safe_load((ROOT / "docker/prometheus/alerts.yml").read_text())
    rules = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}
    rule = rules["SynthGpuMemoryNearFull"]
    assert "synth_gpu_memory_used_bytes" in rule["expr"]
    assert "synth_gpu_memory_total_bytes" in rule["expr"]
    tests = yaml.safe_load((ROOT / "tests/prometheus/alerts_test.yml").read_text())
    tested = {t["alertname"] for group in tests["tests"] for t in group.get("alert_rule_test", [])}
    assert "SynthGpuMemoryNearFull" in tested  # promtool runs it (test_ops_dashboards)
