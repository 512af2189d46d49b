"""GPU metrics: per-device utilization, memory and temperature on a worker's ``/metrics``.

Read from NVIDIA's management library (NVML) through ``nvidia-ml-py`` (import ``pynvml``,
the ``gpu`` extra) when Prometheus scrapes, in the worker's main process; nothing is stored
in the multiprocess files, since these are readings of the device, not counts of jobs.

Only where a GPU is visible. Without the library, without a driver (``libnvidia-ml`` not
found, or found with no device), or with every device hidden by ``CUDA_VISIBLE_DEVICES``,
the collector yields no series and raises nothing; a worker logs why at DEBUG, and at
WARNING only when a driver is there but NVML refuses to start (permissions, a driver/library
mismatch). ``SYNTH_GPU_METRICS=false`` turns it off.

Series, labelled ``gpu`` (NVML's device index) and ``name`` (the model), both bounded:

===================================  ==================================================
``synth_gpu_utilization_ratio``      share (0-1) of the last sample period a kernel ran
``synth_gpu_memory_used_bytes``      device memory in use (every process on the device)
``synth_gpu_memory_total_bytes``     device memory installed
``synth_gpu_temperature_celsius``    core temperature
===================================  ==================================================

A reading a device does not support (``NVML_ERROR_NOT_SUPPORTED``), or one that fails (a
GPU fallen off the bus), is left out for that scrape; the other readings still come.

``CUDA_VISIBLE_DEVICES``, when set, limits the devices to those it names, as CUDA would: a
list of indexes or ``GPU-`` UUIDs (a prefix is enough), read up to the first entry that is
neither; empty or ``-1``: none. NVML numbers devices in PCI bus order, CUDA by default
fastest first: set ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (or use UUIDs) on hosts with mixed GPUs.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

#: The series this module exports (:func:`synth_workers.metrics.metric_names` lists them).
GPU_METRICS = (
    "synth_gpu_utilization_ratio",
    "synth_gpu_memory_used_bytes",
    "synth_gpu_memory_total_bytes",
    "synth_gpu_temperature_celsius",
)
LABELS = ("gpu", "name")
_QUIET_ERRORS = {"NVML_ERROR_LIBRARY_NOT_FOUND", "NVML_ERROR_DRIVER_NOT_LOADED"}


@dataclass(frozen=True)
class Device:
    index: int
    name: str
    uuid: str
    handle: Any


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def visible_entries(value: str | None) -> list[str] | None:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it: ``None`` (unset: every device), else the
    entries up to the first that is neither an index nor a ``GPU-`` UUID."""
    if value is None:
        return None
    entries: list[str] = []
    for raw in value.split(","):
        entry = raw.strip()
        if entry.isdigit() or entry.startswith("GPU-"):
            entries.append(entry)
        else:
            break
    return entries


def _is_visible(device: Device, entries: list[str] | None) -> bool:
    if entries is None:
        return True
    return any(
        (e.isdigit() and int(e) == device.index)
        or (e.startswith("GPU-") and device.uuid.startswith(e))
        for e in entries
    )


class GpuCollector(Collector):
    """NVML readings per visible device, taken on each scrape.

    ``nvml``: the module to use (a test double of ``pynvml``); unset, ``pynvml`` is imported
    on the first scrape. NVML is started once; :meth:`close` shuts it down.
    """

    def __init__(self, nvml: Any = None, visible: str | None = None) -> None:
        self._nvml = nvml
        self._visible = visible_entries(
            visible if visible is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
        )
        self._lock = threading.Lock()
        self._started = False
        self._devices: list[Device] = []
        #: Why no series are exported (``None`` while devices are found or not yet looked for).
        self.reason: str | None = None

    @property
    def devices(self) -> list[Device]:
        """The visible devices (found on first use)."""
        self._start()
        return list(self._devices)

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
            self._devices = self._find()
        if self._devices:
            names = ", ".join(f"{d.index}: {d.name}" for d in self._devices)
            log.info("GPU metrics for %d device(s): %s", len(self._devices), names)

    def _find(self) -> list[Device]:
        nvml = self._nvml
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                return self._none(f"nvidia-ml-py is not installed (the gpu extra): {exc}")
            self._nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            code = _error_name(nvml, exc)
            reason = f"NVML did not start ({code}: {exc}): no NVIDIA driver visible"
            return self._none(reason, warn=code not in _QUIET_ERRORS)
        except OSError as exc:
            return self._none(f"NVML could not be loaded: {exc}")
        try:
            found = []
            for index in range(int(nvml.nvmlDeviceGetCount())):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                device = Device(
                    index,
                    _text(nvml.nvmlDeviceGetName(handle)),
                    _text(nvml.nvmlDeviceGetUUID(handle)),
                    handle,
                )
                if _is_visible(device, self._visible):
                    found.append(device)
        except nvml.NVMLError as exc:
            self._shutdown(nvml)
            return self._none(f"NVML could not list the devices: {exc}", warn=True)
        if not found:
            self._shutdown(nvml)
            hidden = " (hidden by CUDA_VISIBLE_DEVICES)" if self._visible is not None else ""
            return self._none(f"no GPU visible to NVML{hidden}")
        return found

    def _none(self, reason: str, warn: bool = False) -> list[Device]:
        self.reason = reason
        (log.warning if warn else log.debug)("GPU metrics off: %s", reason)
        return []

    @staticmethod
    def _shutdown(nvml: Any) -> None:
        try:
            nvml.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)

    def close(self) -> None:
        """Shut NVML down if this collector started it."""
        with self._lock:
            if self._devices and self._nvml is not None:
                self._shutdown(self._nvml)
            self._devices = []

    def collect(self) -> Iterator[Metric]:
        self._start()
        devices = self._devices
        if not devices:
            return
        nvml = self._nvml
        util = GaugeMetricFamily(
            GPU_METRICS[0],
            "Share of the last sample period a kernel ran on the GPU (0-1), from NVML.",
            labels=LABELS,
        )
        used = GaugeMetricFamily(
            GPU_METRICS[1], "GPU memory in use, every process together, from NVML.", labels=LABELS
        )
        total = GaugeMetricFamily(GPU_METRICS[2], "GPU memory installed.", labels=LABELS)
        temp = GaugeMetricFamily(GPU_METRICS[3], "GPU core temperature.", labels=LABELS)
        for device in devices:
            labels = (str(device.index), device.name)
            h = device.handle
            rates = _read(nvml, device, "utilization", nvml.nvmlDeviceGetUtilizationRates, h)
            if rates is not None:
                util.add_metric(labels, float(rates.gpu) / 100.0)
            memory = _read(nvml, device, "memory", nvml.nvmlDeviceGetMemoryInfo, h)
            if memory is not None:
                used.add_metric(labels, float(memory.used))
                total.add_metric(labels, float(memory.total))
            sensor = nvml.NVML_TEMPERATURE_GPU
            celsius = _read(nvml, device, "temperature", nvml.nvmlDeviceGetTemperature, h, sensor)
            if celsius is not None:
                temp.add_metric(labels, float(celsius))
        for family in (util, used, total, temp):
            if family.samples:
                yield family


def _read(nvml: Any, device: Device, what: str, call: Any, *args: Any) -> Any:
    """One NVML reading, or ``None`` when the device cannot give it now."""
    try:
        return call(*args)
    except nvml.NVMLError as exc:
        log.debug("GPU %d: no %s reading: %s", device.index, what, exc)
        return None


def _error_name(nvml: Any, exc: Exception) -> str:
    """The ``NVML_ERROR_*`` name of an NVML error's code (its number when unknown)."""
    code = getattr(exc, "value", None)
    for name in dir(nvml):
        if name.startswith("NVML_ERROR_") and getattr(nvml, name) == code:
            return name
    return str(code)
