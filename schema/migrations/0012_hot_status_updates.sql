-- Room for HOT updates: a job's row is inserted `running` and updated with its outcome
-- (and again on a retry). PostgreSQL updates a row in place on its own page, touching no
-- index, when no indexed column changes and the page has room for the new version. The
-- rows of a page are inserted together and updated together, before the old versions can
-- be pruned, so each page keeps half its space free: room for every row's next version.
-- The index that served only counting by queue and status goes (0010 may have replaced
-- it already). Any index that holds `status` makes a status change a non-HOT update.
DROP INDEX IF EXISTS jobs_queue_status_idx;
ALTER TABLE jobs SET (fillfactor = 50);
