-- Capped deferrals: a job deferred on a provider's 429 (no attempt used) remembers when it
-- first deferred; past SYNTH_DEFER_MAX_SECONDS a 429 is a failed attempt, class
-- 'rate_limited'.
ALTER TABLE synth_jobs ADD COLUMN IF NOT EXISTS first_deferred_at timestamptz;
ALTER TABLE synth_jobs DROP CONSTRAINT IF EXISTS synth_jobs_failure_class_check;
ALTER TABLE synth_jobs ADD CONSTRAINT synth_jobs_failure_class_check CHECK (failure_class IN (
    'exception', 'soft_timeout', 'hard_timeout', 'worker_lost', 'poison_pill',
    'rejected_message', 'rate_limited'));
