"""Stands in for an environment without nvidia-ml-py: on PYTHONPATH before site-packages,
``import pynvml`` fails as it does where the library is not installed."""

raise ModuleNotFoundError("No module named 'pynvml' (hidden by tests/no_nvml)", name="pynvml")
