-- Request tracing: the caller's request id (correlation id) a job carries, from its message's
-- synth_correlation_id header (synth_workers.correlation). Jobs a job starts carry it too, so
-- `synth-workers jobs list --correlation-id ID` finds a request's whole work; the partial
-- index keeps jobs without one out of it.
ALTER TABLE synth_jobs ADD COLUMN IF NOT EXISTS correlation_id text;
CREATE INDEX IF NOT EXISTS synth_jobs_correlation ON synth_jobs (correlation_id, enqueued_at DESC)
    WHERE correlation_id IS NOT NULL;
