-- The Celery message as sent (protocol 2: headers, body [args, kwargs, embed], properties),
-- so that every re-publish sends it back whole (chain, link, link_error, chord, group, root
-- and parent ids, expires, time limits, shadow, stamps) with only retries, eta and routing
-- changed. NULL for rows written before this migration: those are re-sent from task, args
-- and payload as before.
ALTER TABLE synth_jobs ADD COLUMN IF NOT EXISTS message jsonb;
-- Celery's request.retries: retries asked for (self.retry, autoretry, the platform's retry
-- policy), not worker losses; the message header `retries` on every re-publish.
ALTER TABLE synth_jobs ADD COLUMN IF NOT EXISTS retries integer NOT NULL DEFAULT 0;
