-- Each job's trace id (32 hex digits), so that its page can link to its trace; NULL when
-- the job was neither traced nor published with a `traceparent`.
ALTER TABLE jobs ADD COLUMN trace_id text;

-- The dashboard's job list: newest first within a queue (and a status), paged by keyset on
-- (created_at, id). Every list query names its queues (all of them: one index scan each,
-- merged), so these two serve every filter. The second leads with (queue, status) and so
-- replaces the index that served only counting by queue and status.
CREATE INDEX jobs_queue_created_idx ON jobs (queue, created_at, id);
CREATE INDEX jobs_queue_status_created_idx ON jobs (queue, status, created_at, id);
DROP INDEX jobs_queue_status_idx;

-- Throughput and failures over the last hour.
CREATE INDEX job_executions_finished_idx ON job_executions (finished_at);
