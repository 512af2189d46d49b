"""The ledger's schema: SQL migrations applied once each, in name order, under a lock."""

from __future__ import annotations

from importlib import resources
from typing import Any

import psycopg
from psycopg import sql

from synth_workers.ledger.pool import LedgerPool


class Migrations(LedgerPool):
    """Creates ``SYNTH_DB_SCHEMA`` and the ledger's tables in it."""

    def migrate(self) -> list[str]:
        """Apply the SQL migrations not yet applied; return their names."""
        files = sorted(
            (
                p
                for p in resources.files("synth_workers.ledger.migrations").iterdir()
                if p.name.endswith(".sql")
            ),
            key=lambda p: p.name,
        )
        applied: list[str] = []
        with self.connect() as conn:
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                    sql.Identifier(self.settings.db_schema)
                )
            )
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('synth_migrations'))")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS synth_schema_migrations "
                    "(name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                done = {r[0] for r in conn.execute("SELECT name FROM synth_schema_migrations")}
                for file in files:
                    if file.name in done:
                        continue
                    # A migration file is trusted text shipped in the package.
                    conn.execute(sql.SQL(file.read_text()))
                    conn.execute(
                        "INSERT INTO synth_schema_migrations (name) VALUES (%s)", (file.name,)
                    )
                    applied.append(file.name)
        return applied

    @staticmethod
    def check_tables(conn: psycopg.Connection[Any]) -> None:
        """Raise (``psycopg.errors.UndefinedTable``) unless the ledger's tables exist in the
        schema ``conn`` searches."""
        conn.execute("SELECT 1 FROM synth_jobs LIMIT 0")
