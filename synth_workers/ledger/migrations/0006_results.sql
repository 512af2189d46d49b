-- Celery's result API reads the ledger (synth_workers.backend): a dead job's exception is
-- rebuilt as Celery does (exception_to_python), which needs its module and its arguments
-- besides the class name (error_class) and message (last_error) already kept.
ALTER TABLE synth_jobs ADD COLUMN IF NOT EXISTS error_module text;
ALTER TABLE synth_jobs ADD COLUMN IF NOT EXISTS error_args jsonb;

-- Chords counted in the ledger: one row per chord (its header's group id). ``size`` is set
-- by the producer (Celery's set_chord_size) before the header's last part is sent; ``fired``
-- turns true in the same transaction that writes the callback's job row (outbox), so the
-- callback is enqueued exactly once.
CREATE TABLE IF NOT EXISTS synth_chords (
    group_id    text PRIMARY KEY,
    size        integer,
    fired       boolean     NOT NULL DEFAULT false,
    callback_id text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    fired_at    timestamptz
);

-- One row per finished header part: a part that runs again (its worker was killed after it
-- reported) is counted once, with its first outcome.
CREATE TABLE IF NOT EXISTS synth_chord_parts (
    group_id    text        NOT NULL REFERENCES synth_chords (group_id) ON DELETE CASCADE,
    job_id      text        NOT NULL,
    index       integer,
    state       text        NOT NULL,
    result      jsonb,
    finished_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, job_id)
);

-- A chord's callback and its header part jobs, recorded when the chord is applied: a part
-- that runs again from a message that lost its chord (re-published by the reaper or the
-- reconciler) is still counted (looked up only for attempts after the first).
ALTER TABLE synth_chords ADD COLUMN IF NOT EXISTS callback jsonb;
CREATE TABLE IF NOT EXISTS synth_chord_members (
    job_id   text    PRIMARY KEY,
    group_id text    NOT NULL,
    index    integer
);
