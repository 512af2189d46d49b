-- Whether anyone may wait on a job through Celery's API (synth_waits), so that the completion
-- statement looks synth_waits up only for such jobs: the look-up was about a tenth of that
-- statement's Postgres CPU in a drain nobody waits on (bench/README.md, drain). False only for
-- a job whose id the platform generated at enqueue and whose row was committed before anyone
-- had the id (enqueue() and delay() without a task_id, enqueue_many() without a connection):
-- whoever waits on it marks the row (synth_workers.ledger.results.mark_waited). Every other
-- row (a canvas step, a chord callback, an adopted message, a caller-given id: one that may be
-- waited on before its row exists) keeps the default, and rows from before this migration too.
ALTER TABLE synth_jobs ADD COLUMN IF NOT EXISTS maybe_waited boolean NOT NULL DEFAULT true;
