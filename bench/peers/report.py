"""Summaries of the runs: medians and ranges over rounds, the printed table, Markdown, JSON."""

from __future__ import annotations

import os
import platform
import statistics
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from bench.peers.harness import Run

PACKAGES = (
    "synth-workers",
    "celery",
    "kombu",
    "redis",
    "hiredis",
    "psycopg",
    "huey",
    "dramatiq",
    "rq",
    "arq",
)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), linear between closest ranks; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def spread(values: list[float | None]) -> dict[str, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(present), "min": min(present), "max": max(present)}


FIGURES = ("enqueue_per_s", "bulk_per_s", "drain_per_s")
LATENCIES = ("latency", "wait")
PCTS = (50, 95, 99)


def per_round(run: Run) -> dict[str, float | None]:
    """A run's figures: rates (jobs/s) and latency percentiles (ms)."""
    row: dict[str, float | None] = {name: getattr(run, name) for name in FIGURES}
    for name, values in (("latency", run.latency_s), ("wait", run.wait_s)):
        for q in PCTS:
            p = percentile(values, q)
            row[f"{name}_p{q}_ms"] = None if p is None else p * 1000
    return row


def summarise(runs: list[Run], peers: list[str]) -> dict[str, dict[str, Any]]:
    """Per peer: each figure's median and range over the rounds, plus counts and notes."""
    out: dict[str, dict[str, Any]] = {}
    for name in peers:
        mine = [r for r in runs if r.peer == name]
        rows = [per_round(r) for r in mine]
        keys = rows[0].keys() if rows else []
        summary: dict[str, Any] = {key: spread([row[key] for row in rows]) for key in keys}
        summary["rounds"] = len(mine)
        summary["jobs"] = mine[0].jobs if mine else None
        summary["bulk_note"] = next((r.bulk_note for r in mine if r.bulk_note), "")
        summary["ok"] = all(r.ok for r in mine)
        out[name] = summary
    return out


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


def cell(s: dict[str, float | None], spec: str = ".0f", rounds: int = 1) -> str:
    if s["median"] is None:
        return "-"
    if rounds < 2 or s["min"] == s["max"]:
        return fmt(s["median"], spec)
    return f"{fmt(s['median'], spec)} ({fmt(s['min'], spec)}-{fmt(s['max'], spec)})"


COLUMNS = (
    ("single enqueue jobs/s", "enqueue_per_s", ".0f"),
    ("bulk enqueue jobs/s", "bulk_per_s", ".0f"),
    ("drain jobs/s", "drain_per_s", ".0f"),
    ("start p50 ms", "latency_p50_ms", ".2f"),
    ("start p95 ms", "latency_p95_ms", ".2f"),
    ("start p99 ms", "latency_p99_ms", ".2f"),
    ("wait() p50 ms", "wait_p50_ms", ".1f"),
    ("wait() p95 ms", "wait_p95_ms", ".1f"),
    ("wait() p99 ms", "wait_p99_ms", ".1f"),
)


def markdown(summary: dict[str, dict[str, Any]], rounds: int) -> str:
    """The table: median over the rounds, range in brackets."""
    head = "| peer | jobs | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 2) + "|"]
    for name, s in summary.items():
        cells = [cell(s[key], spec, rounds) if key in s else "-" for _, key, spec in COLUMNS]
        lines.append(f"| {name} | {s['jobs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(redis_server: str) -> dict[str, Any]:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?"
            )
    except OSError:
        model = platform.processor() or "?"
    versions: dict[str, str] = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "redis_server": redis_server,
        "versions": versions,
    }


RATIO_FIGURES = (
    ("single enqueue", "enqueue_per_s", ".0f"),
    ("drain", "drain_per_s", ".0f"),
    ("start p50", "latency_p50_ms", ".2f"),
    ("start p99", "latency_p99_ms", ".2f"),
)


def ratios(runs: list[Run], peers: list[str], base: str = "celery") -> dict[str, Any]:
    """Each peer's figure over ``base``'s in the same round (rates: above 1 is faster;
    latencies: above 1 is slower), with both figures, then the median and range."""
    out: dict[str, Any] = {}
    if base not in peers:
        return out
    for name in peers:
        if name == base:
            continue
        figures: dict[str, Any] = {}
        for _, key, _spec in RATIO_FIGURES:
            rows = []
            for rnd in sorted({r.round for r in runs}):
                mine = next((r for r in runs if r.peer == name and r.round == rnd), None)
                other = next((r for r in runs if r.peer == base and r.round == rnd), None)
                if mine is None or other is None:
                    continue
                a, b = per_round(mine)[key], per_round(other)[key]
                rows.append({"round": rnd, name: a, base: b, "ratio": a / b if a and b else None})
            figures[key] = {"per_round": rows, **spread([r["ratio"] for r in rows])}
        out[name] = figures
    return out


def ratio_table(table: dict[str, Any], base: str = "celery") -> str:
    """Markdown: per peer and figure, the median ratio (range) and each round's two figures."""
    lines = [
        f"| peer / {base} (same round) | " + " | ".join(f[0] for f in RATIO_FIGURES) + " |",
        "|---" * (len(RATIO_FIGURES) + 1) + "|",
    ]
    for name, figures in table.items():
        cells = []
        for _, key, spec in RATIO_FIGURES:
            fig = figures[key]
            rounds = "; ".join(
                f"{fmt(r[name], spec)} / {fmt(r[base], spec)}" for r in fig["per_round"]
            )
            cells.append(f"{cell(fig, '.2f', len(fig['per_round']))} [{rounds}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
