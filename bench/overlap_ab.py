"""The overlapped row and publish (``synth_workers.ledger.early``) against the row first,
then the publish, and plain Celery, interleaved in one process.

On a machine whose speed drifts within seconds (a shared VM), separate runs, even separate
rounds, compare different machines. This one alternates short blocks of each variant, so
drift hits all alike, and reports the median of the per-block rates and of the ratios of
neighbouring blocks:

* ``overlapped``: ``synth_workers.enqueue`` as shipped;
* ``row-first``: the same call with the row's ``INSERT`` committed before the publish (the
  path before the overlap, which a send with an idempotency key still takes): the
  benchmark replaces ``publish._overlapped`` and ``bulk.overlapped`` with that sequence;
* ``celery``: plain Celery's ``apply_async`` (``bench/raw_app.py``);
* and the same for ``enqueue_many`` (``--bulk`` jobs per call), overlapped and row-first.

Run (repository root; Redis and Postgres running, the Redis database flushed)::

    .venv/bin/python -m bench.overlap_ab --redis-url redis://127.0.0.1:6390/0 \\
        --database-url postgresql://postgres@127.0.0.1:5432/bench --blocks 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.enqueue import QUEUE, SCHEMA, _setup_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--blocks", type=int, default=20, help="blocks of each variant")
    parser.add_argument("--single", type=int, default=200, help="single sends per block")
    parser.add_argument("--bulk", type=int, default=2000, help="jobs per enqueue_many call")
    opts = parser.parse_args(argv)
    _setup_env(opts.redis_url, opts.database_url)

    import psycopg
    import redis

    from bench import raw_app
    from synth_workers import app, bulk, bulkrows, enqueue, enqueue_many, publish, wire

    with psycopg.connect(opts.database_url, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    app.ledger.migrate()
    app.loader.import_default_modules()
    client = redis.Redis.from_url(opts.redis_url)
    overlapped_one, overlapped_many = publish._overlapped, bulk.overlapped

    def row_first_one(task: Any, row: dict[str, Any], out: Any, id_only: bool = False) -> Any:
        with app.ledger.connection() as own:
            app.ledger.insert_job(own, **row)
        wire.publish(task.app, [out], app.ledger.lifecycle, [publish._event(task, row)])
        return row["job_id"] if id_only else task.AsyncResult(row["job_id"])

    def row_first_many(batch: Any, ids: list[str], make: Any) -> None:
        outs: list[Any] = []
        data: list[Any] = []
        for start in range(0, len(ids), batch.chunk_size):
            built, items, _args = make(start, start + batch.chunk_size)
            outs += built
            data += items
        stored = [out.stored() for out in outs]
        bulkrows.insert_rows(batch, None, ids, [None] * len(ids), data, stored)
        bulkrows.publish(batch, ids, range(len(ids)), outs, None)

    def single(send: Callable[[], Any]) -> float:
        started = time.perf_counter()
        for _ in range(opts.single):
            send()
        return opts.single / (time.perf_counter() - started)

    def many() -> float:
        started = time.perf_counter()
        enqueue_many("bench.platform_noop", [{}] * opts.bulk, queue=QUEUE)
        return opts.bulk / (time.perf_counter() - started)

    def variant(one: Any, more: Any) -> None:
        publish._overlapped = one  # type: ignore[attr-defined]
        bulk.overlapped = more  # type: ignore[attr-defined]

    platform = lambda: enqueue("bench.platform_noop", {}, queue=QUEUE)  # noqa: E731
    celery = lambda: raw_app.noop.apply_async(queue=QUEUE)  # noqa: E731
    rates: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    for block in range(opts.blocks + 1):  # the first block warms up, not kept
        variant(overlapped_one, overlapped_many)
        got = {"overlapped": single(platform), "bulk overlapped": many()}
        got["celery"] = single(celery)
        variant(row_first_one, row_first_many)
        got["row-first"] = single(platform)
        got["bulk row-first"] = many()
        variant(overlapped_one, overlapped_many)
        client.flushdb()
        if block == 0:
            continue
        for name, rate in got.items():
            rates.setdefault(name, []).append(rate)
        for label, (a, b) in {
            "overlapped / celery": ("overlapped", "celery"),
            "row-first / celery": ("row-first", "celery"),
            "overlapped / row-first": ("overlapped", "row-first"),
            "bulk overlapped / row-first": ("bulk overlapped", "bulk row-first"),
        }.items():
            ratios.setdefault(label, []).append(got[a] / got[b])
    print(f"{opts.blocks} blocks: {opts.single} single sends, 1 x {opts.bulk} bulk per variant")
    print(f"{'variant':28s} {'jobs/s median':>14s} {'min':>8s} {'max':>8s}")
    for name, values in rates.items():
        low, high = min(values), max(values)
        print(f"{name:28s} {statistics.median(values):14.0f} {low:8.0f} {high:8.0f}")
    print(f"{'ratio (same block)':28s} {'median':>14s} {'min':>8s} {'max':>8s}")
    for label, values in ratios.items():
        print(
            f"{label:28s} {statistics.median(values):14.2f} {min(values):8.2f} {max(values):8.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
