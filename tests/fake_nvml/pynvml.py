"""A test double of ``pynvml`` (nvidia-ml-py): the calls synth_workers.gpu makes, answering
from ``DEVICES`` as a machine with two GPUs would. No GPU exists on the test machines; the
no-GPU path is tested against the real library.

Put this folder on PYTHONPATH to give a worker process these two GPUs, or load the file
under another name and change its globals to shape one test's machine.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return f"fake NVML error {self.value}"


GIB = 1024**3
#: One dict per device; a reading set to an int is raised as that NVML error code.
DEVICES: list[dict[str, Any]] = [
    {"name": "NVIDIA H200", "uuid": "GPU-0a1b2c3d-0000-1111-2222-333344445555",
     "gpu": 37, "used": 5 * GIB, "total": 141 * GIB, "temperature": 41},
    {"name": b"NVIDIA L4", "uuid": b"GPU-9f8e7d6c-0000-1111-2222-333344445555",
     "gpu": 100, "used": 22 * GIB, "total": 24 * GIB, "temperature": 78},
]  # fmt: skip
INIT_ERROR: int | None = None
calls = {"init": 0, "shutdown": 0}
_initialised = False


def _check() -> None:
    if not _initialised:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)


def _reading(handle: int, key: str) -> Any:
    _check()
    value = DEVICES[handle][key]
    if key in ("gpu", "used", "temperature") and isinstance(value, int) and value < 0:
        raise NVMLError(-value)
    return value


def nvmlInit() -> None:
    global _initialised
    calls["init"] += 1
    if INIT_ERROR is not None:
        raise NVMLError(INIT_ERROR)
    _initialised = True


def nvmlShutdown() -> None:
    global _initialised
    _check()
    calls["shutdown"] += 1
    _initialised = False


def nvmlDeviceGetCount() -> int:
    _check()
    return len(DEVICES)


def nvmlDeviceGetHandleByIndex(index: int) -> int:
    _check()
    return index


def nvmlDeviceGetName(handle: int) -> Any:
    return _reading(handle, "name")


def nvmlDeviceGetUUID(handle: int) -> Any:
    return _reading(handle, "uuid")


def nvmlDeviceGetUtilizationRates(handle: int) -> SimpleNamespace:
    return SimpleNamespace(gpu=_reading(handle, "gpu"), memory=0)


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:
    used = _reading(handle, "used")
    total = DEVICES[handle]["total"]
    return SimpleNamespace(used=used, total=total, free=total - used)


def nvmlDeviceGetTemperature(handle: int, sensor: int) -> int:
    assert sensor == NVML_TEMPERATURE_GPU
    return int(_reading(handle, "temperature"))
