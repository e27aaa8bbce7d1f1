-- Remove a consumer from a group only if it holds nothing, atomically: a consumer that
-- reads between a check and the delete would otherwise lose its pending entries.
-- KEYS[1] = the stream  ARGV[1] = group  ARGV[2] = consumer
-- Returns 1 when removed, 0 when it holds entries (or is unknown).
local held = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #held > 0 then
    return 0
end
return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) >= 0 and 1 or 0
