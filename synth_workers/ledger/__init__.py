"""The Postgres job ledger: the source of truth for every job's state."""

from synth_workers.ledger.lease import LeaseKeeper
from synth_workers.ledger.store import Claim, Ledger, Publishable

__all__ = ["Claim", "LeaseKeeper", "Ledger", "Publishable"]
