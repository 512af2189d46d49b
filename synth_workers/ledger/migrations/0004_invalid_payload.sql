-- A payload that does not bind to its task's signature or model at the worker is dead at
-- once with its own failure class, 'invalid_payload' (never retried).
ALTER TABLE synth_jobs DROP CONSTRAINT IF EXISTS synth_jobs_failure_class_check;
ALTER TABLE synth_jobs ADD CONSTRAINT synth_jobs_failure_class_check CHECK (failure_class IN (
    'exception', 'soft_timeout', 'hard_timeout', 'worker_lost', 'poison_pill',
    'rejected_message', 'rate_limited', 'invalid_payload'));
