"""RQ's jobs for the peers benchmark (plain functions: RQ imports them by name).
Workers: ``rq worker -u URL bench-peers``, twice (the default ``Worker``: a fork per job)."""

from __future__ import annotations

from bench.peers.probe import record_start


def noop() -> None:
    return None


def probe(key: str) -> None:
    record_start(key)
