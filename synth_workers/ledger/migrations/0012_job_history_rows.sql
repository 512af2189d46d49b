-- A finished job's events as one row per job (replaces 0011's row per event): the archive
-- (synth_workers.events.history) writes each job once, so a job costs the ledger one tuple
-- and one index entry instead of one per event. ``events`` is a JSON array of
-- [ms, seq, fields] in stream order; (last_ms, last_seq) is its last id, so a job archived
-- again (replayed after it ended) appends only what came after. Rows of jobs no longer in
-- synth_jobs are deleted by the retention pass (Queries.apply_retention).
CREATE TABLE IF NOT EXISTS synth_job_history (
    job_id   uuid   PRIMARY KEY,
    last_ms  bigint NOT NULL,
    last_seq bigint NOT NULL,
    events   jsonb  NOT NULL
);

DO $$
BEGIN
    IF to_regclass('synth_job_events') IS NOT NULL THEN
        INSERT INTO synth_job_history (job_id, last_ms, last_seq, events)
        SELECT job_id,
               (array_agg(ms ORDER BY ms DESC, seq DESC))[1],
               (array_agg(seq ORDER BY ms DESC, seq DESC))[1],
               jsonb_agg(jsonb_build_array(ms, seq, fields) ORDER BY ms, seq)
        FROM synth_job_events GROUP BY job_id
        ON CONFLICT DO NOTHING;
        DROP TABLE synth_job_events;
    END IF;
END
$$;
