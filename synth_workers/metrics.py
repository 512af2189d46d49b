"""Prometheus metrics: per-worker job metrics, and the cluster-wide gauges.

**Per worker** (``/metrics`` on ``SYNTH_METRICS_ADDRESS:SYNTH_METRICS_PORT``): counters and
histograms fed by the ledger's lifecycle announcements (``synth_workers.lifecycle``), so a
job is counted where its state change commits, once. Under the prefork pool every process
writes its values to memory-mapped files in one folder per worker (prometheus-client's
multiprocess mode, ``PROMETHEUS_MULTIPROC_DIR``); the main process sums them on each scrape.
A pool child recycled by ``--max-tasks-per-child`` leaves its file behind, so nothing it
counted is lost, and nothing is counted twice (a reused pid continues its own file).

**Cluster-wide** (``synth-workers metrics serve``): queue depth per queue and priority
(every Redis priority sub-list), delayed jobs, oldest waiting job, DLQ size, workers per
queue and beat's last slot. These are facts about the cluster, not about one worker, so one
process exports them: exported by every worker they would be counted once per worker.

Naming: ``synth_`` prefix, ``_total`` counters, seconds; labels are bounded (``task``,
``queue``, ``outcome``, ``failure_class``, ``priority``) and never a job id.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from synth_workers.gpu import GPU_METRICS, GpuCollector
from synth_workers.lifecycle import JobEvent
from synth_workers.states import FINAL_KINDS

if TYPE_CHECKING:
    from synth_workers.app import SynthCelery

#: Seconds; jobs range from milliseconds (email) to many minutes (LLM workflows).
RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                   600, 1800, 3600)  # fmt: skip
WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
FINAL_OUTCOMES = tuple(sorted(FINAL_KINDS))
#: The gauges of ``synth-workers metrics serve`` (see :class:`ClusterCollector`).
CLUSTER_METRICS = (
    "synth_queue_depth",
    "synth_queue_delayed",
    "synth_queue_oldest_job_age_seconds",
    "synth_queue_workers",
    "synth_dlq_size",
    "synth_ledger_jobs",
    "synth_beat_last_slot_timestamp_seconds",
    "synth_workers_up",
)
UNKNOWN = "unknown"


class JobMetrics:
    """The worker-side metrics; made once per worker, after multiprocess mode is set."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry
        self._hot: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self.jobs = Counter(
            "synth_jobs",
            "Jobs that reached a final state, by task, queue and outcome "
            "(succeeded, dead, cancelled).",
            ("task", "queue", "outcome"),
            registry=r,
        )
        self.started = Counter(
            "synth_jobs_started", "Attempts started (claimed).", ("task", "queue"), registry=r
        )
        self.retries = Counter(
            "synth_job_retries", "Failed attempts that will be retried.", ("task", "queue"),
            registry=r,
        )  # fmt: skip
        self.dead_lettered = Counter(
            "synth_jobs_dead_lettered",
            "Jobs dead-lettered, by failure class.",
            ("task", "queue", "failure_class"),
            registry=r,
        )
        self.rejected = Counter(
            "synth_rejected_messages",
            "Messages a worker refused before running them, by the layer that refused them "
            "(reason: size, envelope, compression, content_type, body, header, unknown_task, "
            "expired, protocol, binding).",
            ("reason",),
            registry=r,
        )
        self.lease_expiries = Counter(
            "synth_lease_expiries",
            "Running jobs taken back because their lease expired (worker dead or frozen).",
            ("queue",),
            registry=r,
        )
        self.late_completions = Counter(
            "synth_late_completions",
            "Finishes refused because the worker had lost the job's lease.",
            ("task", "queue"),
            registry=r,
        )
        self.runtime = Histogram(
            "synth_job_runtime_seconds",
            "Seconds an attempt ran (claim to finish).",
            ("task", "queue"),
            buckets=RUNTIME_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "synth_job_queue_wait_seconds",
            "Seconds from enqueue to the start of an attempt.",
            ("task", "queue"),
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.worker_up = Gauge(
            "synth_worker_up",
            "1 while this worker process runs.",
            registry=r,
            multiprocess_mode="max",
        )
        self.llm_tokens = Counter(
            "synth_llm_tokens",
            "LLM tokens used by jobs, by provider, model and kind (prompt, completion).",
            ("provider", "model", "kind"),
            registry=r,
        )
        self.llm_credits = Counter(
            "synth_credits_charged",
            "LLM credits (provider cost units) used by jobs.",
            ("provider",),
            registry=r,
        )

    def _children(self, kind: str, task: str, queue: str) -> tuple[Any, Any]:
        """The labelled metrics every job touches, looked up once per (kind, task, queue):
        ``labels()`` validates and locks on every call (a few % of a no-op job's time)."""
        key = (kind, task, queue)
        found = self._hot.get(key)
        if found is None:
            if kind == "started":
                found = (self.started.labels(task, queue), self.queue_wait.labels(task, queue))
            else:  # a final outcome, or ``retrying`` (no ``synth_jobs`` series of its own)
                jobs = None if kind == "retrying" else self.jobs.labels(task, queue, kind)
                found = (self.runtime.labels(task, queue), jobs)
            self._hot[key] = found
        return found

    def observe(self, event: JobEvent) -> None:
        """Lifecycle listener: count one committed state change."""
        kind = event.kind
        task = event.task or UNKNOWN
        queue = event.queue or UNKNOWN
        data = event.data
        if kind == "started":
            started, waits = self._children(kind, task, queue)
            started.inc()
            wait = data.get("queue_wait")
            if wait is not None:
                waits.observe(float(wait))
            return
        if kind == "queued":
            if data.get("reason") == "lease_expired":
                self.lease_expiries.labels(queue).inc()
            return
        if kind == "late_refused":
            self.late_completions.labels(task, queue).inc()
            return
        if kind == "usage":  # an LLM call's tokens and credits (tasks/llm_calls.py)
            provider = str(data.get("provider") or UNKNOWN)
            model = str(data.get("model") or UNKNOWN)
            self.llm_tokens.labels(provider, model, "prompt").inc(
                int(data.get("input_tokens") or 0)
            )
            self.llm_tokens.labels(provider, model, "completion").inc(
                int(data.get("output_tokens") or 0)
            )
            credits = float(data.get("credits") or 0)
            if credits:
                self.llm_credits.labels(provider).inc(credits)
            return
        if kind not in ("retrying", *FINAL_OUTCOMES):
            return
        runtimes, jobs = self._children(kind, task, queue)
        runtime = data.get("runtime")
        if runtime is not None:
            runtimes.observe(float(runtime))
        if kind == "retrying":
            self.retries.labels(task, queue).inc()
            return
        jobs.inc()
        if kind == "dead":
            failure = str(data.get("failure_class") or UNKNOWN)
            self.dead_lettered.labels(task, queue, failure).inc()
            if failure == "rejected_message":
                self.rejected.labels(str(data.get("reason") or UNKNOWN)).inc()
            elif failure == "invalid_payload":
                self.rejected.labels("binding").inc()
            if data.get("error_class") == "LeaseExpired":
                self.lease_expiries.labels(queue).inc()


_lock = threading.Lock()
_metrics: JobMetrics | None = None
_dir: Path | None = None
_own_dir = False
_gpu: GpuCollector | None = None


def worker_metrics() -> JobMetrics | None:
    """This worker's metrics; ``None`` outside a worker with metrics on."""
    return _metrics


# Every metric write holds this lock, and a fork waits for it: a pool child is never forked
# while another thread of its parent is inside prometheus-client's (unforkable) value lock.
_write_lock = threading.Lock()
os.register_at_fork(
    before=_write_lock.acquire,
    after_in_parent=_write_lock.release,
    after_in_child=_write_lock.release,
)


def observe(event: JobEvent) -> None:
    """Lifecycle listener connected by the app factory (a no-op until a worker enables it)."""
    metrics = _metrics
    if metrics is not None:
        with _write_lock:
            metrics.observe(event)


def enable_worker_metrics(parent: Path | None, name: str, gpu: bool = False) -> Path:
    """Turn on multiprocess mode in this (the worker's main) process, before the pool forks.

    Each worker gets a fresh folder of its own: ``parent/<name>`` when
    ``PROMETHEUS_MULTIPROC_DIR`` is set (emptied first: a restarted worker starts at zero,
    as Prometheus expects of a new process), a private temporary folder otherwise.
    ``gpu``: also serve the GPU readings (:mod:`synth_workers.gpu`; none without a GPU).
    """
    global _metrics, _dir, _own_dir, _gpu
    with _lock:
        if _metrics is not None and _dir is not None:
            return _dir
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "worker"
        if parent is not None:
            path = Path(parent) / safe
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            _own_dir = False
        else:
            path = Path(tempfile.mkdtemp(prefix=f"synth-metrics-{safe}-"))
            _own_dir = True
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)  # pool children inherit it
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        _dir = path
        _metrics = JobMetrics(registry=None)
        _gpu = GpuCollector() if gpu else None
        with _write_lock:
            _metrics.worker_up.set(1)
        return path


def disable_worker_metrics() -> None:
    """The worker stops: its value files go (a private folder is removed)."""
    global _metrics, _dir, _gpu
    with _lock:
        if _gpu is not None:
            _gpu.close()
            _gpu = None
        if _metrics is not None:
            with _write_lock:
                _metrics.worker_up.set(0)
        if _dir is not None and _own_dir:
            shutil.rmtree(_dir, ignore_errors=True)
        _metrics = None
        _dir = None


def worker_registry() -> CollectorRegistry:
    """Every process's values summed, plus the GPU readings: what a worker's /metrics serves."""
    registry = CollectorRegistry()
    if _dir is not None:
        MultiProcessCollector(registry, path=str(_dir))  # type: ignore[no-untyped-call]
    if _gpu is not None:
        registry.register(_gpu)
    return registry


# --- cluster-wide gauges -------------------------------------------------------------------


class ClusterCollector(Collector):
    """Collects the cluster gauges from Redis and the ledger on scrape (cached briefly)."""

    def __init__(self, app: SynthCelery, cache_seconds: float = 2.0) -> None:
        self.app = app
        self.cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._at = 0.0
        self._families: list[Metric] = []

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if time.monotonic() - self._at >= self.cache_seconds:
                self._families = list(self._build())
                self._at = time.monotonic()
            families = self._families
        yield from families

    def _build(self) -> Iterable[Metric]:
        from synth_workers.cluster import snapshot

        snap = snapshot(self.app)
        depth = GaugeMetricFamily(
            "synth_queue_depth",
            "Messages waiting in Redis, by queue and priority (0-9, bigger runs first).",
            labels=("queue", "priority"),
        )
        delayed = GaugeMetricFamily(
            "synth_queue_delayed",
            "Jobs waiting in the ledger for their time (delayed jobs and retry backoffs).",
            labels=("queue",),
        )
        oldest = GaugeMetricFamily(
            "synth_queue_oldest_job_age_seconds",
            "Age of the oldest job that could run now but has not started.",
            labels=("queue",),
        )
        workers = GaugeMetricFamily(
            "synth_queue_workers", "Live workers consuming the queue.", labels=("queue",)
        )
        for q in snap["queues"]:
            for level, count in q["depth"].items():
                depth.add_metric((q["queue"], str(level)), count)
            delayed.add_metric((q["queue"],), q["delayed"])
            oldest.add_metric((q["queue"],), q["oldest_age_seconds"] or 0.0)
            workers.add_metric((q["queue"],), q["workers"])
        dlq = GaugeMetricFamily("synth_dlq_size", "Dead-lettered jobs in the ledger.")
        dlq.add_metric((), snap["dlq_size"])
        states = GaugeMetricFamily(
            "synth_ledger_jobs", "Unfinished jobs in the ledger, by state.", labels=("state",)
        )
        for state, count in snap["unfinished"].items():
            states.add_metric((state,), count)
        beat = GaugeMetricFamily(
            "synth_beat_last_slot_timestamp_seconds",
            "Unix time beat last enqueued a periodic slot (0: never).",
        )
        beat.add_metric((), snap["beat_last_slot"] or 0.0)
        up = GaugeMetricFamily("synth_workers_up", "Live workers (from their heartbeats).")
        up.add_metric((), len(snap["workers"]))
        return (depth, delayed, oldest, workers, dlq, states, beat, up)


def cluster_registry(app: SynthCelery) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ClusterCollector(app))
    return registry


def metric_names() -> set[str]:
    """Every metric name this package exports (series names as Prometheus stores them)."""
    names: set[str] = set()
    registry = CollectorRegistry()
    JobMetrics(registry=registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    for family in registry.collect():
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    names.update(CLUSTER_METRICS)
    names.update(GPU_METRICS)
    return names
