"""Benchmarks of SynthStack Workers against plain Celery (not tests; never collected by pytest)."""
