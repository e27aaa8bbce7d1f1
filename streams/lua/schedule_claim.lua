-- Publish one occurrence of a schedule unless it or a later one was published already:
-- the schedule's cursor and the entry are one script in the queue's slot, so however many
-- replicas run the scheduler, each occurrence is published once (they publish in order).
-- KEYS[1] = jobs:{q}:schedule:<name>  KEYS[2] = jobs:{q}
-- ARGV[1] = occurrence (ms since the epoch)  ARGV[2..] = field, value, ... of the entry
-- Returns {1, entry id} when published, {0, the cursor} when it was claimed before.
local cursor = tonumber(redis.call('GET', KEYS[1]) or '-1')
if cursor >= tonumber(ARGV[1]) then
    return {0, tostring(cursor)}
end
local entry = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('SET', KEYS[1], ARGV[1])
return {1, entry}
