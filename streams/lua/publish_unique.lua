-- Publish a job unless its id was published to this queue within the unique window:
-- the claim and the entry are one script in the queue's slot, so of two producers racing
-- with the same id exactly one writes an entry.
-- KEYS[1] = jobs:{q}:unique:<job id>  KEYS[2] = jobs:{q} (now) or jobs:{q}:delayed (later)
-- ARGV[1] = window (ms)  ARGV[2] = due time (ms), or '' to publish now
-- ARGV[3] = the delayed member (later), ARGV[4..] = field, value, ... of the entry (now)
-- Returns {1, entry id or 'delayed'} when published, {0, what the first publish wrote}
-- when refused.
local have = redis.call('GET', KEYS[1])
if have then
    return {0, have}
end
local where = 'delayed'
if ARGV[2] == '' then
    where = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
else
    redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
end
redis.call('SET', KEYS[1], where, 'PX', ARGV[1])
return {1, where}
