-- `cancelled` in the status CHECK of `jobs` as it is now, whatever a migration between
-- 0011 and this one made of the table (e.g. recreated it partitioned with the older
-- vocabulary). On a partitioned table the parent's CHECK covers every partition.
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
