-- The batch tier (synth_workers.batchtier): deferrable LLM and embedding requests sent through
-- the providers' batch APIs. One row per batch, written as an intent (state 'submitting',
-- with its items' custom ids) before the provider is asked, so that a process killed between
-- submitting and recording looks the batch up at the provider instead of sending a second
-- one. ``next_check_at`` is a work lease: the process that took the row acts on it until
-- then; after, any process may (a dead one's batch is recovered).
CREATE TABLE IF NOT EXISTS synth_batches (
    id                uuid PRIMARY KEY,
    provider          text        NOT NULL,
    model             text        NOT NULL,
    kind              text        NOT NULL CHECK (kind IN ('chat', 'embeddings')),
    state             text        NOT NULL DEFAULT 'submitting'
                          CHECK (state IN ('submitting', 'submitted', 'applying', 'ended')),
    provider_batch_id text UNIQUE,
    provider_status   text,
    items             integer     NOT NULL,
    tokens            bigint      NOT NULL DEFAULT 0,
    next_check_at     timestamptz NOT NULL DEFAULT now(),
    created_at        timestamptz NOT NULL DEFAULT now(),
    submitted_at      timestamptz,
    ended_at          timestamptz
);
CREATE INDEX IF NOT EXISTS synth_batches_open ON synth_batches (next_check_at)
    WHERE state <> 'ended';

-- One row per deferred request (its job), written in the same transaction that parks the job
-- (still 'running' in synth_jobs, owner 'batch-tier', a lease that never lapses). A result
-- is written once: the UPDATE is guarded by the item's state and batch, and the job is put
-- back in its queue in that transaction; its next run reads the result instead of calling
-- the provider. ``custom_id`` changes each time the item joins a batch (``generation``).
CREATE TABLE IF NOT EXISTS synth_batch_items (
    job_id      uuid PRIMARY KEY,
    provider    text        NOT NULL,
    model       text        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('chat', 'embeddings')),
    request     jsonb       NOT NULL,
    tokens      integer     NOT NULL,
    state       text        NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'batched', 'done', 'failed', 'online')),
    batch_id    uuid REFERENCES synth_batches (id),
    custom_id   text UNIQUE,
    generation  integer     NOT NULL DEFAULT 0,
    returned    integer     NOT NULL DEFAULT 0,
    result      jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz
);
CREATE INDEX IF NOT EXISTS synth_batch_items_pending
    ON synth_batch_items (provider, model, kind, created_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS synth_batch_items_batch ON synth_batch_items (batch_id)
    WHERE batch_id IS NOT NULL;
