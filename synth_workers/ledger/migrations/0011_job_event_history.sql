-- A finished job's events (synth_workers.events.history): written once its final event is
-- in Redis, so that its Redis stream can go a few seconds later (SYNTH_EVENTS_GRACE) while
-- readers (JobHandle.events(), SSE with Last-Event-ID) still get its whole history. One row
-- per event; (ms, seq) is the event's stream id, the same in Redis and here. ``fields`` are
-- the stream entry's fields but ``job``. Rows of jobs no longer in synth_jobs are deleted by
-- the retention pass (Queries.apply_retention), as effects are.
CREATE TABLE IF NOT EXISTS synth_job_events (
    job_id uuid   NOT NULL,
    ms     bigint NOT NULL,
    seq    bigint NOT NULL,
    fields jsonb  NOT NULL,
    PRIMARY KEY (job_id, ms, seq)
);
