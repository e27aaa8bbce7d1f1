-- Status changes as HOT updates: a job's row is inserted `running` and updated with its
-- outcome (and on every retry). PostgreSQL can update a row in place on its own page,
-- touching no index, only when no indexed column changes and the page has room. `status`
-- changes on every update, so it is in no index (counts per queue and status scan the
-- table, which only `jobstream status` and the demo do), and each page of `jobs` keeps
-- 30 % free for the updated versions of its rows.
DROP INDEX IF EXISTS jobs_queue_status_idx;
ALTER TABLE jobs SET (fillfactor = 70);
