-- Time partitions (DESIGN inv. 8): `jobs` and `job_executions` are partitioned by range of
-- the job's creation time, so a retention drops whole partitions and never deletes rows.
-- A job's creation time is its first entry's time; retries and replays carry it in their
-- `created_ms` field, so every write and every lookup by id names one partition.
--
-- Unique keys of a partitioned table must hold the partition key: `jobs` is unique on
-- (id, created_at) and `job_executions` on (job_id, attempt, stream_entry_id, delivery,
-- job_created_at). Every write of a job derives the same creation time from its entry, so
-- ON CONFLICT on those keys meets the same rows as before.
--
-- An existing deployment's tables become the partition `*_legacy`, covering every time up
-- to the end of the current UTC day, without copying their rows (only rows created past
-- that, from explicit entry IDs ahead of the clock, move to the default partition). An
-- empty deployment's tables are replaced. The default partitions take rows no time
-- partition covers yet; `jobstream migrate` and workers create the time partitions ahead
-- and adopt such rows into them (streams/partitions.py).
DO $$
DECLARE
    upto timestamptz := date_trunc('day', now(), 'UTC') + interval '1 day';
    has_rows boolean := EXISTS (SELECT 1 FROM jobs) OR EXISTS (SELECT 1 FROM job_executions);
BEGIN
    ALTER TABLE jobs RENAME TO jobs_legacy;
    ALTER TABLE jobs_legacy RENAME CONSTRAINT jobs_pkey TO jobs_legacy_id_key;
    ALTER INDEX jobs_queue_created_idx RENAME TO jobs_legacy_queue_created_idx;
    ALTER INDEX jobs_queue_status_created_idx RENAME TO jobs_legacy_queue_status_created_idx;
    ALTER INDEX job_executions_finished_idx RENAME TO job_executions_legacy_finished_idx;
    ALTER TABLE job_executions RENAME TO job_executions_legacy;
    ALTER TABLE job_executions_legacy
        RENAME CONSTRAINT job_executions_pkey TO job_executions_legacy_id_key;
    ALTER INDEX job_executions_delivery_key RENAME TO job_executions_legacy_delivery_key;
    DROP INDEX job_executions_job_idx;  -- a prefix of the delivery key

    CREATE TABLE jobs (LIKE jobs_legacy INCLUDING DEFAULTS INCLUDING CONSTRAINTS)
        PARTITION BY RANGE (created_at);
    ALTER TABLE jobs ADD PRIMARY KEY (id, created_at);
    -- The job lists' keyset indexes (0010); a legacy partition's own attach to them.
    CREATE INDEX jobs_queue_created_idx ON jobs (queue, created_at, id);
    CREATE INDEX jobs_queue_status_created_idx ON jobs (queue, status, created_at, id);
    -- Jobs not yet over: what keeps a partition from being dropped, found without a scan.
    CREATE INDEX jobs_live_idx ON jobs (created_at) WHERE status NOT IN ('completed', 'failed');
    CREATE TABLE jobs_default PARTITION OF jobs DEFAULT;

    ALTER TABLE job_executions_legacy ADD COLUMN job_created_at timestamptz;
    CREATE TABLE job_executions (LIKE job_executions_legacy INCLUDING DEFAULTS)
        PARTITION BY RANGE (job_created_at);
    ALTER TABLE job_executions ALTER COLUMN job_created_at SET NOT NULL;
    ALTER SEQUENCE job_executions_id_seq OWNED BY job_executions.id;
    ALTER TABLE job_executions ADD PRIMARY KEY (id, job_created_at);
    CREATE UNIQUE INDEX job_executions_delivery_key
        ON job_executions (job_id, attempt, stream_entry_id, delivery, job_created_at);
    CREATE INDEX job_executions_finished_idx ON job_executions (finished_at);
    CREATE TABLE job_executions_default PARTITION OF job_executions DEFAULT;

    IF NOT has_rows THEN
        DROP TABLE jobs_legacy;
        DROP TABLE job_executions_legacy;
        RETURN;
    END IF;

    -- An execution lives with its job: the job's creation time, else its own start.
    UPDATE job_executions_legacy e SET job_created_at = coalesce(
        (SELECT j.created_at FROM jobs_legacy j WHERE j.id = e.job_id), e.started_at);
    ALTER TABLE job_executions_legacy ALTER COLUMN job_created_at SET NOT NULL;

    WITH moved AS (DELETE FROM jobs_legacy WHERE created_at >= upto RETURNING *)
    INSERT INTO jobs_default SELECT * FROM moved;
    WITH moved AS (DELETE FROM job_executions_legacy WHERE job_created_at >= upto RETURNING *)
    INSERT INTO job_executions_default SELECT * FROM moved;

    ALTER TABLE jobs_legacy DROP CONSTRAINT jobs_legacy_id_key;
    ALTER TABLE job_executions_legacy DROP CONSTRAINT job_executions_legacy_id_key;
    DROP INDEX job_executions_legacy_delivery_key;
    EXECUTE format(
        'ALTER TABLE jobs ATTACH PARTITION jobs_legacy FOR VALUES FROM (MINVALUE) TO (%L)',
        upto);
    EXECUTE format(
        'ALTER TABLE job_executions ATTACH PARTITION job_executions_legacy '
        'FOR VALUES FROM (MINVALUE) TO (%L)', upto);
END
$$;

-- When each maintenance task last ran (workers prune once a day, whichever gets there).
CREATE TABLE job_partition_runs (
    task   text PRIMARY KEY,
    ran_at timestamptz NOT NULL,
    ran_by text NOT NULL
);
