-- Whether someone waits on this job through Celery's API, set on the row itself by the
-- waiter's mark (synth_workers.ledger.results.mark_waited) beside its synth_waits row.
-- The completion statement reads the wait from synth_waits with its own snapshot: a mark that
-- committed while the completion waited for the row's lock was not seen there, so no notice
-- was published while the waiter, having read the row before the completion committed, went
-- on waiting. The mark locks the row to set this column, and a completion that waited for
-- that lock reads the row's newest version, so it sees the column.
ALTER TABLE synth_jobs ADD COLUMN IF NOT EXISTS waited boolean NOT NULL DEFAULT false;
