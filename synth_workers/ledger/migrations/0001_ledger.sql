-- The job ledger: one row per job, the source of truth for its state.
CREATE TABLE IF NOT EXISTS synth_jobs (
    id               uuid PRIMARY KEY,
    task             text        NOT NULL,
    queue            text        NOT NULL,
    priority         smallint    NOT NULL CHECK (priority BETWEEN 0 AND 9),
    payload          jsonb       NOT NULL,
    args             jsonb,
    idempotency_key  text,
    state            text        NOT NULL CHECK (state IN ('scheduled', 'queued', 'running',
                         'succeeded', 'failed-retrying', 'dead', 'cancelled')),
    attempt          integer     NOT NULL DEFAULT 0,
    max_attempts     integer,
    lease_owner      text,
    lease_expires_at timestamptz,
    run_at           timestamptz,
    published_at     timestamptz,
    enqueued_at      timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    worker_losses    integer     NOT NULL DEFAULT 0,
    cancel_requested boolean     NOT NULL DEFAULT false,
    failure_class    text CHECK (failure_class IN ('exception', 'soft_timeout', 'hard_timeout',
                         'worker_lost', 'poison_pill', 'rejected_message')),
    error_class      text,
    last_error       text,
    traceback        text,
    result           jsonb,
    replay_of        uuid,
    user_id          text
) WITH (fillfactor = 80);

-- Due scheduled jobs and retries, promoted by the sweeper.
CREATE INDEX IF NOT EXISTS synth_jobs_due ON synth_jobs (run_at)
    WHERE state IN ('scheduled', 'failed-retrying');
-- Leases to reap.
CREATE INDEX IF NOT EXISTS synth_jobs_leases ON synth_jobs (lease_expires_at)
    WHERE state = 'running';
-- Queued jobs to reconcile with Redis, and outbox rows not yet published.
CREATE INDEX IF NOT EXISTS synth_jobs_queued ON synth_jobs (published_at NULLS FIRST)
    WHERE state = 'queued';
-- The dead-letter queue and listings.
-- (Every index costs each state change an index insert: keep the hot path to the partial
-- indexes above plus these two. Listings by state/task scan the dead index or the table.)
CREATE INDEX IF NOT EXISTS synth_jobs_dead ON synth_jobs (finished_at) WHERE state = 'dead';
CREATE INDEX IF NOT EXISTS synth_jobs_enqueued ON synth_jobs (enqueued_at);

-- Idempotency keys: a key maps to one job until it expires.
CREATE TABLE IF NOT EXISTS synth_idempotency (
    key        text PRIMARY KEY,
    job_id     uuid        NOT NULL,
    expires_at timestamptz NOT NULL
);

-- Effects a job recorded (the effect guard): each (job, key) at most once.
CREATE TABLE IF NOT EXISTS synth_effects (
    job_id      uuid        NOT NULL,
    key         text        NOT NULL,
    detail      jsonb,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, key)
);

-- Completions refused because the worker had lost its lease (fencing).
CREATE TABLE IF NOT EXISTS synth_late_completions (
    id          bigserial PRIMARY KEY,
    job_id      uuid        NOT NULL,
    attempt     integer     NOT NULL,
    owner       text        NOT NULL,
    outcome     text        NOT NULL,
    refused_at  timestamptz NOT NULL DEFAULT now()
);

-- Periodic slots already enqueued (exactly once per slot, however many beats run).
CREATE TABLE IF NOT EXISTS synth_periodic_slots (
    name       text        NOT NULL,
    slot       timestamptz NOT NULL,
    job_id     uuid        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, slot)
);
