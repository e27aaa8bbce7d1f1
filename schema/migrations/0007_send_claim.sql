-- Which delivery of a job holds its message's send (DESIGN inv. 9): a replica that was
-- paused and lost the job to another replica cannot take the send back on waking.
ALTER TABLE outbound_messages ADD COLUMN claim_fence numeric;
