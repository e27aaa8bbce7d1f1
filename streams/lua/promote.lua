-- Move due entries of one queue from its delayed set to its stream, atomically.
-- KEYS[1] = jobs:{q}:delayed  KEYS[2] = jobs:{q}  (same hash tag: one slot)
-- ARGV[1] = now in ms  ARGV[2] = most entries to move
-- Each member is a JSON object of the entry's string fields. Returns how many moved.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
    local ok, fields = pcall(cjson.decode, member)
    local args = {}
    if ok and type(fields) == 'table' then
        for k, v in pairs(fields) do
            args[#args + 1] = tostring(k)
            args[#args + 1] = tostring(v)
        end
    end
    if #args == 0 then
        -- Unreadable member: publish it as a payload so the worker dead-letters it visibly.
        args = {'payload', member, 'reason', 'undecodable delayed entry'}
    end
    redis.call('XADD', KEYS[2], '*', unpack(args))
    redis.call('ZREM', KEYS[1], member)
end
return #due
