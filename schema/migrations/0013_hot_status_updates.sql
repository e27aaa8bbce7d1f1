-- Room for HOT updates: a job's row is inserted `running` and updated with its outcome
-- (and again on a retry). PostgreSQL updates a row in place on its own page, touching no
-- index, when no indexed column changes and the page has room for the new version. The
-- rows of a page are inserted together and updated together, before the old versions can
-- be pruned, so each page keeps half its space free: room for every row's next version.
-- The index that served only counting by queue and status goes (0010 replaced it). Any
-- index that holds `status` makes a status change a non-HOT update.
--
-- `jobs` is partitioned (0012): a partitioned table stores nothing, so the fill factor is
-- set on each partition that exists now; those made later (streams/partitions.py) are
-- created with it.
DROP INDEX IF EXISTS jobs_queue_status_idx;
DO $$
DECLARE
    part regclass;
BEGIN
    FOR part IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'jobs'::regclass
    LOOP
        EXECUTE format('ALTER TABLE %s SET (fillfactor = 50)', part);
    END LOOP;
END
$$;
