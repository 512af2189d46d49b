-- Celery's `expires`: the time after which a job that has not started never runs (it ends
-- 'cancelled', last_error 'expired'). Checked at promotion, claim, reconcile and retry, and
-- by the sweeper, which ends live rows past it (the partial index below keeps that cheap).
ALTER TABLE synth_jobs ADD COLUMN IF NOT EXISTS expires_at timestamptz;
CREATE INDEX IF NOT EXISTS synth_jobs_expiring ON synth_jobs (expires_at)
    WHERE expires_at IS NOT NULL AND state IN ('scheduled', 'queued', 'failed-retrying');
