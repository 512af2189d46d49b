-- The stored Celery message (0005) is read only when a job is published again (retry,
-- promotion, reaper, reconciler, DLQ replay), but it is most of a row's width: inline, every
-- claim and completion copied it into the new row version, fewer versions fit a page and
-- fewer updates stayed HOT (every index updated). Out of line (TOAST, uncompressed), an
-- update that does not change it copies an 18-byte pointer. Rows over 256 bytes are toasted.
ALTER TABLE synth_jobs ALTER COLUMN message SET STORAGE EXTERNAL;
ALTER TABLE synth_jobs SET (toast_tuple_target = 256);
