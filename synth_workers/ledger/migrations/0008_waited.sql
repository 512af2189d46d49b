-- Jobs someone waits on through Celery's API (AsyncResult.get(), then(), GroupResult.get()):
-- written by the waiter before it subscribes (the job may not exist yet: a chord's callback),
-- read by the completion statement. Only a waited-on job's success is announced on Celery's
-- result channel, so the hot path of fire-and-forget jobs publishes nothing
-- (synth_workers.backend). Rows go with retention, after the job TTL.
CREATE TABLE IF NOT EXISTS synth_waits (
    job_id uuid PRIMARY KEY,
    at     timestamptz NOT NULL DEFAULT now()
);
