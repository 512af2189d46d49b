"""``LedgerPool.held``: a worker process's job thread keeps its claim connection between
jobs, gives back a broken one (and the next claim gets a new one), and nothing else keeps
one: not another thread, not a process that is not a worker (a test, a script)."""

from __future__ import annotations

import threading

import psycopg
import pytest

from synth_workers import app
from synth_workers.errors import ServiceUnavailableError
from synth_workers.ledger.pool import LedgerPool


def _pid(ledger: LedgerPool) -> int:
    with ledger.held() as conn:
        conn.execute("SELECT 1")
        return conn.info.backend_pid


def test_a_worker_keeps_its_claim_connection_and_replaces_a_broken_one(database_url: str) -> None:
    ledger = LedgerPool(app.settings)
    ledger.use_fast_commits()  # what a worker process does at start
    try:
        first = _pid(ledger)
        assert _pid(ledger) == first  # kept between uses
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (first,))
        with pytest.raises(ServiceUnavailableError):
            _pid(ledger)
        second = _pid(ledger)  # a new one, kept in turn
        assert second != first and _pid(ledger) == second
        # another thread's use goes back to the pool at once
        seen: list[int] = []
        thread = threading.Thread(target=lambda: seen.append(_pid(ledger)))
        thread.start()
        thread.join()
        assert seen and list(ledger._held) == [(ledger._pid, threading.get_ident())]
    finally:
        ledger.close()
    assert not ledger._held  # given back at close


def test_a_process_that_is_not_a_worker_keeps_none() -> None:
    ledger = LedgerPool(app.settings)
    try:
        _pid(ledger)
        assert not ledger._held
    finally:
        ledger.close()
