"""The Postgres job ledger: every job's row, and every state change as one fenced statement.

:class:`Ledger` is the one object callers hold; its parts, one concern each, live beside it:

- ``pool``: connections (per-process pool, dedicated connections, commit durability) and
  the outage rule (:func:`is_connection_failure`); tables live in ``SYNTH_DB_SCHEMA``;
- ``migrate``: the schema's migrations;
- ``rows``: :class:`Claim`, :class:`Publishable`, value encoders, announce helpers;
- ``jobs``: insert, adopt, tombstone, read, cancel, refused messages, effects;
- ``early``: a plain enqueue's row sent while its message is published, and a worker's
  tombstone for a message that came before its row;
- ``fencing``: claim, lease renewal and every fenced finish (succeed, retry, dead, defer);
- ``recovery``: lost workers, hard time limits, reaping, expiry, purges, the sweeper's passes;
- ``queries``: listings and filters, DLQ operations, the cluster's counts, periodic slots.

This module also keeps the names callers imported from it before the split.
"""

from __future__ import annotations

from synth_workers.ledger.fencing import Fencing
from synth_workers.ledger.migrate import Migrations
from synth_workers.ledger.pool import is_connection_failure
from synth_workers.ledger.queries import LedgerCounts, Queries, QueueCounts
from synth_workers.ledger.recovery import Recovery
from synth_workers.ledger.rows import (
    NOTIFY_CHANNEL,
    RESULT_LIMIT_BYTES,
    Claim,
    Publishable,
    encode_result,
    message_json,
)


class Ledger(Migrations, Fencing, Recovery, Queries):
    """Reads and writes the job ledger."""


__all__ = [
    "NOTIFY_CHANNEL",
    "RESULT_LIMIT_BYTES",
    "Claim",
    "Ledger",
    "LedgerCounts",
    "Publishable",
    "QueueCounts",
    "encode_result",
    "is_connection_failure",
    "message_json",
]
