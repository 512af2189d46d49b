"""The GPU check (bench/gpu_check.py) and the embeddings benchmark's GPU mode, on a machine
without a GPU: their refusals, the check's CPU path end to end (real workers, Redis and
Postgres), and the GPU figures' reading and report, from a worker given the NVML double."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.embeddings import GpuSampler
from bench.gpu_check import exporter_readings, summary
from synth_workers.gpu import GpuCollector

from .conftest import ROOT
from .test_gpu_metrics import FAKE_NVML, GIB, fake_nvml
from .test_ops_metrics import free_port


def bench(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def no_gpu_here() -> None:
    collector = GpuCollector()
    if collector.devices:
        collector.close()
        pytest.skip("this machine has a GPU: run bench/gpu_check.py itself")


def test_gpu_check_without_a_gpu_refuses_at_once_and_says_why(tmp_path: Path) -> None:
    no_gpu_here()
    out = tmp_path / "gpu_check.json"
    done = bench("bench.gpu_check", "--out", str(out), timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "no GPU to check" in done.stderr and "NVML" in done.stderr
    assert "--allow-cpu" in done.stderr
    assert not out.exists()


def test_embeddings_device_cuda_refused_without_cuda(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here")
    out = tmp_path / "embeddings.json"
    done = bench("bench.embeddings", "--device", "cuda", "--out", str(out), timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--device cuda" in done.stderr and "no CUDA device" in done.stderr
    assert not out.exists()


def test_gpu_check_cpu_path(tmp_path: Path, redis_url: str, database_url: str) -> None:
    """--allow-cpu: the whole check on the CPU, its figures in the file."""
    out = tmp_path / "gpu_check.json"
    done = bench(
        "bench.gpu_check", "--allow-cpu", "--jobs", "8", "--no-ceiling", "--out", str(out),
        "--redis-url", redis_url, "--database-url", database_url, "--timeout", "240",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["mode"].startswith("cpu")
    assert report["exporter_before"]["devices"] == {}
    assert "NVML" in report["exporter_before"]["reason"]
    embeddings = report["embeddings"]
    assert embeddings["exit"] == 0, embeddings
    runs = embeddings["report"]["runs"]
    assert {r["mode"] for r in runs} == {"batched", "unbatched"}
    for run in runs:
        assert run["errors"] == [] and run["log_problems"] == [], run
        assert run["jobs"] == 8 and run["jobs_per_s"] > 0
        # the worker's /metrics was read during the drain: it answered, with no GPU series
        assert run["gpu"]["scrapes"] >= 2 and run["gpu"]["worker_up"] is True
        assert run["gpu"]["devices"] == {}
    assert embeddings["report"]["device"]["requested"] == "cpu"
    assert "batched" in done.stdout and "no GPU series" in done.stdout


def test_gpu_figures_read_from_a_workers_metrics_and_reported(
    rclient: Any, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU path of the check's report, on a worker given two GPUs by the NVML double."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    port = free_port()
    path = os.pathsep.join(filter(None, [str(FAKE_NVML), os.environ.get("PYTHONPATH")]))
    start_worker("gpu-bench", env={"SYNTH_METRICS_PORT": str(port), "PYTHONPATH": path})
    sampler = GpuSampler(port)
    sampler.sample(idle=True)
    sampler.sample()
    figures = sampler.summary()
    assert figures["scrapes"] == 2 and figures["worker_up"] is True
    h200 = figures["devices"]["0"]
    assert h200["name"] == "NVIDIA H200"
    assert h200["memory_used_idle_bytes"] == h200["memory_used_max_bytes"] == 5 * GIB
    assert h200["memory_total_bytes"] == 141 * GIB
    assert h200["utilization_max"] == pytest.approx(0.37)
    assert figures["devices"]["1"]["temperature_max_celsius"] == 78

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml())
    exporter = exporter_readings()
    assert exporter["devices"]["1"]["memory_used_bytes"] == 22 * GIB
    run = {"mode": "batched", "gpu": figures, "errors": []}
    report = {
        "machine": "m",
        "mode": "cuda",
        "exporter_before": exporter,
        "embeddings": {
            "report": {
                "jobs": 1000,
                "device": {"requested": "cuda", "gpu": "NVIDIA H200"},
                "median_jobs_per_s": {"batched": 900.0, "unbatched": 150.0},
                "speedup": 6.0,
                "runs": [run],
            }
        },
    }
    lines = summary(report)
    assert (
        "- exporter, GPU 1 NVIDIA L4: memory 22528 of 24576 MiB, utilization 100%, 78 °C" in lines
    )
    assert any(
        line.startswith("- embeddings (1000 jobs per mode, on NVIDIA H200)") for line in lines
    )
    worker_line = "- batched worker, GPU 0: memory 5120 MiB idle (model loaded), 5120 MiB peak; "
    assert worker_line + "utilization max 37%" in lines
