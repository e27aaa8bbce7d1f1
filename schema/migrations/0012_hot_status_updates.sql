-- Status changes as HOT updates: a job's row is inserted `running` and updated with its
-- outcome (and again on a retry). PostgreSQL updates a row in place on its own page,
-- touching no index, only when no indexed column changes and the page has room for the
-- new version. `status` changes on every update, so it is in no index (counts per queue
-- and status scan the table; only `jobstream status` and the demo ask for them). The
-- rows of a page are inserted together and updated together, before the old versions
-- can be pruned, so each page keeps half its space free: room for every row's next
-- version (pruning frees the old ones for the update after).
DROP INDEX IF EXISTS jobs_queue_status_idx;
ALTER TABLE jobs SET (fillfactor = 50);
