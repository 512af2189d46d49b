-- AI workflows (tasks.orchestration): one row per workflow; its parts count up in the same
-- transaction as each part job's completion, so the aggregate is enqueued exactly once.
CREATE TABLE IF NOT EXISTS synth_workflows (
    id               uuid PRIMARY KEY,
    name             text,
    user_id          text,
    provider         text        NOT NULL,
    model            text        NOT NULL,
    instruction      text        NOT NULL,
    aggregate_instruction text,
    max_tokens       integer     NOT NULL,
    notify           jsonb       NOT NULL DEFAULT '[]',
    total            integer     NOT NULL CHECK (total > 0),
    done             integer     NOT NULL DEFAULT 0,
    state            text        NOT NULL DEFAULT 'running'
                         CHECK (state IN ('running', 'aggregating', 'completed')),
    aggregate_job_id uuid,
    result           jsonb,
    created_at       timestamptz NOT NULL DEFAULT now(),
    completed_at     timestamptz
);

-- One row per finished part (document); written with the part job's completion.
CREATE TABLE IF NOT EXISTS synth_workflow_parts (
    workflow_id   uuid        NOT NULL REFERENCES synth_workflows (id) ON DELETE CASCADE,
    index         integer     NOT NULL,
    document_id   text        NOT NULL,
    job_id        uuid        NOT NULL,
    output        text        NOT NULL,
    finished_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workflow_id, index)
);

-- Token usage and credits per LLM job (at most one row per job), per user.
CREATE TABLE IF NOT EXISTS synth_usage (
    job_id        uuid PRIMARY KEY,
    user_id       text,
    workflow_id   uuid,
    provider      text           NOT NULL,
    model         text           NOT NULL,
    input_tokens  integer        NOT NULL,
    output_tokens integer        NOT NULL,
    credits       numeric(18, 6) NOT NULL,
    recorded_at   timestamptz    NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS synth_usage_user ON synth_usage (user_id, recorded_at);
CREATE INDEX IF NOT EXISTS synth_usage_workflow ON synth_usage (workflow_id);
