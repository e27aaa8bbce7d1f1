-- Fencing (DESIGN inv. 9): every status write carries the token of the delivery it comes
-- from, and a row only moves forward. The token orders deliveries of a job: the stream
-- entry ID (retries and replays are newer entries) then Redis's delivery count (a reclaim
-- is a newer delivery of the same entry). NULL: written before fencing, older than any.
ALTER TABLE jobs ADD COLUMN fence numeric;

-- One execution row per job, attempt, entry and delivery: a flush re-sent after its commit
-- reply was lost adds nothing.
ALTER TABLE job_executions ADD COLUMN stream_entry_id text;
ALTER TABLE job_executions ADD COLUMN delivery integer;
CREATE UNIQUE INDEX job_executions_delivery_key
    ON job_executions (job_id, attempt, stream_entry_id, delivery);
