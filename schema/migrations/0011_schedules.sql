-- `cancelled` joins the status vocabulary: terminal, like `completed` and `failed`.
-- The CHECK is found by what it checks, whatever name it was given. Applied before 0012,
-- the CHECK is copied into the partitioned `jobs` (LIKE ... INCLUDING CONSTRAINTS); after
-- it, the partitioned parent's CHECK is replaced, which every partition inherits.
DO $$
DECLARE c record;
BEGIN
    FOR c IN SELECT conname FROM pg_constraint
             WHERE conrelid = 'jobs'::regclass AND contype = 'c'
               AND pg_get_constraintdef(oid) LIKE '%status%' LOOP
        EXECUTE format('ALTER TABLE jobs DROP CONSTRAINT %I', c.conname);
    END LOOP;
END $$;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_check
    CHECK (status IN ('queued', 'running', 'retrying', 'completed', 'failed', 'cancelled'));

-- Recurring schedules: each occurrence is published once by whichever worker replica
-- claims it first in Redis; `next_run_at` is the first occurrence not known to be published.
CREATE TABLE schedules (
    name         text PRIMARY KEY,
    queue        text NOT NULL,
    payload      jsonb NOT NULL,
    cron         text,
    every_s      integer CHECK (every_s >= 1),
    tz           text NOT NULL DEFAULT 'UTC',
    catch_up     text NOT NULL DEFAULT 'latest' CHECK (catch_up IN ('latest', 'all', 'none')),
    paused       boolean NOT NULL DEFAULT false,
    next_run_at  timestamptz NOT NULL,
    last_run_at  timestamptz,
    last_job_id  text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CHECK ((cron IS NULL) <> (every_s IS NULL))
);
