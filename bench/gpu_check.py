"""The GPU check: on a machine with an NVIDIA GPU, the GPU metrics exporter and the
embeddings benchmark on CUDA (batched vs unbatched, jobs/s, GPU memory), in a few minutes,
its figures written to one file.

1. **Exporter, in this process**: :class:`synth_workers.gpu.GpuCollector` reads each visible
   GPU through NVML (utilization, memory used and total, temperature), as a worker's
   ``/metrics`` serves them; ``nvidia-smi``'s view is stored beside it when the tool is there.
2. **torch**: its version, its CUDA, the device it sees.
3. **Embeddings on CUDA**: ``bench.embeddings --device cuda --rounds 1 --metrics-port P``
   in a child process: one real worker per mode (batched, unbatched), N one-document jobs,
   jobs/s per mode and the speed-up; the worker's own ``/metrics`` is read while it drains,
   so the run records the GPU memory the worker holds (idle with the model loaded, and peak)
   as its exporter reports it.
4. **Exporter again**, after the runs.

Run from the repository root, in the environment of ``pip install -e '.[dev]'`` with the
CUDA build of torch (the project pins the version; a CUDA host installs that version's CUDA
build). Redis and Postgres: ``--redis-url``/``--database-url`` (else ``$REDIS_URL``/
``$DATABASE_URL``), else embedded ones, so a bare GPU machine needs nothing else::

    .venv/bin/python -m bench.gpu_check                        # 1000 jobs per mode
    .venv/bin/python -m bench.gpu_check --allow-cpu --jobs 20  # its CPU path, anywhere

Writes ``--out`` (``bench/results/gpu_check.json``) and prints a summary to copy into
bench/README.md. Exit status: 0 done; 1 the benchmark failed (a job lost or failed, or it ran
past ``--timeout``); 2 no GPU visible to NVML or no CUDA device for torch (without
``--allow-cpu``, checked before anything starts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

MIB = 2**20


def exporter_readings() -> dict[str, Any]:
    """What the GPU exporter gives now: per device its series, or why there are none."""
    from prometheus_client import CollectorRegistry

    from synth_workers.gpu import GpuCollector

    collector = GpuCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    devices: dict[str, dict[str, Any]] = {}
    for family in registry.collect():
        for sample in family.samples:
            device = devices.setdefault(sample.labels["gpu"], {"name": sample.labels["name"]})
            device[sample.name.removeprefix("synth_gpu_")] = sample.value
    collector.close()
    return {"devices": devices, "reason": collector.reason}


def nvidia_smi() -> str | None:
    tool = shutil.which("nvidia-smi")
    if tool is None:
        return None
    query = "--query-gpu=index,name,driver_version,memory.used,memory.total,utilization.gpu"
    done = subprocess.run(
        [tool, query, "--format=csv,noheader"], capture_output=True, text=True, check=False
    )
    return (done.stdout or done.stderr).strip()


def torch_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda}
    info["cuda_available"] = bool(torch.cuda.is_available())
    if info["cuda_available"]:
        info["device"] = torch.cuda.get_device_name(0)
        info["device_count"] = torch.cuda.device_count()
    return info


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_embeddings(args: argparse.Namespace, device: str, out: Path) -> dict[str, Any]:
    """``bench.embeddings`` in a child process, within ``--timeout``."""
    argv = [
        sys.executable, "-m", "bench.embeddings", "--device", device, "--rounds", "1",
        "--jobs", str(args.jobs), "--metrics-port", str(free_port()), "--out", str(out),
        "--timeout", str(args.timeout),
    ]  # fmt: skip
    if args.no_ceiling:
        argv.append("--no-ceiling")
    for flag, value in (("--redis-url", args.redis_url), ("--database-url", args.database_url)):
        if value:
            argv += [flag, value]
    t0 = time.monotonic()
    try:
        done = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=args.timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        return {"exit": None, "error": f"ran past {args.timeout:.0f}s", "output": str(exc.stdout)}
    result: dict[str, Any] = {
        "exit": done.returncode,
        "seconds": round(time.monotonic() - t0, 1),
        "output": done.stdout[-4000:],
    }
    if done.returncode != 0:
        result["error"] = done.stderr[-4000:]
    if out.exists():
        result["report"] = json.loads(out.read_text())
    return result


def summary(report: dict[str, Any]) -> list[str]:
    """The figures, as lines for bench/README.md."""
    lines = [f"GPU check on {report['machine']} ({report['mode']}):"]
    for index, gpu in report["exporter_before"]["devices"].items():
        used = gpu.get("memory_used_bytes", 0) / MIB
        lines.append(
            f"- exporter, GPU {index} {gpu['name']}: memory {used:.0f}"
            f" of {gpu.get('memory_total_bytes', 0) / MIB:.0f} MiB, utilization "
            f"{gpu.get('utilization_ratio', 0):.0%}, {gpu.get('temperature_celsius', 0):.0f} °C"
        )
    if not report["exporter_before"]["devices"]:
        lines.append(f"- exporter: no GPU series ({report['exporter_before']['reason']})")
    bench = report["embeddings"].get("report")
    if not bench:
        lines.append(f"- embeddings: failed ({report['embeddings'].get('error', '')[-300:]})")
        return lines
    median = bench["median_jobs_per_s"]
    where = bench["device"].get("gpu", "CPU") if bench["device"]["requested"] != "cpu" else "CPU"
    lines.append(
        f"- embeddings ({bench['jobs']} jobs per mode, on {where}): "
        f"batched {median['batched']:.1f} jobs/s, unbatched {median['unbatched']:.1f} jobs/s, "
        f"speed-up {bench['speedup']:.2f}x"
    )
    if bench.get("model_ceiling"):
        c = bench["model_ceiling"]
        lines.append(f"- model alone on {c['device']}: batching gains at most {c['ratio']:.2f}x")
    for run in bench["runs"]:
        gpu = run.get("gpu") or {}
        for index, dev in (gpu.get("devices") or {}).items():
            lines.append(
                f"- {run['mode']} worker, GPU {index}: memory "
                f"{dev.get('memory_used_idle_bytes', 0) / MIB:.0f} MiB idle (model loaded), "
                f"{dev.get('memory_used_max_bytes', 0) / MIB:.0f} MiB peak; utilization max "
                f"{dev.get('utilization_max', 0):.0%}"
            )
        if gpu and not gpu.get("devices"):
            lines.append(
                f"- {run['mode']} worker /metrics: read {gpu['scrapes']} times, no GPU series"
            )
        if run["errors"]:
            lines.append(f"- {run['mode']} ERRORS: {run['errors']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per mode")
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds for the benchmark")
    parser.add_argument("--allow-cpu", action="store_true", help="no GPU: run the CPU path")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the model-only timing")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gpu_check.json")
    args = parser.parse_args(argv)

    started = time.monotonic()
    before = exporter_readings()
    if not before["devices"] and not args.allow_cpu:  # before torch: its import takes seconds
        print(f"gpu_check: no GPU to check ({before['reason']}); --allow-cpu runs the CPU path",
              file=sys.stderr)  # fmt: skip
        return 2
    torch = torch_info()
    on_gpu = bool(before["devices"]) and torch["cuda_available"]
    if not on_gpu and not args.allow_cpu:
        why = f"torch {torch['version']} (CUDA {torch['cuda']}) sees no CUDA device"
        print(f"gpu_check: no GPU to check ({why}); --allow-cpu runs the CPU path", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    bench_out = args.out.with_name(args.out.stem + "-embeddings.json")
    embeddings = run_embeddings(args, "cuda" if on_gpu else "cpu", bench_out)
    report = {
        "benchmark": "gpu_check",
        "mode": "cuda" if on_gpu else "cpu (no GPU: --allow-cpu)",
        "machine": f"{platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)",
        "nvidia_smi": nvidia_smi(),
        "torch": torch,
        "exporter_before": before,
        "embeddings": embeddings,
        "exporter_after": exporter_readings(),
        "seconds": round(time.monotonic() - started, 1),
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(summary(report)))
    print(f"written {args.out} in {report['seconds']:.0f} s")
    return 0 if embeddings.get("exit") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
