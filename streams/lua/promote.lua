-- Move due entries of one queue from its delayed set to its stream, atomically.
-- KEYS[1] = jobs:{q}:delayed  KEYS[2] = jobs:{q}  (same hash tag: one slot)
-- ARGV[1] = now in ms  ARGV[2] = most entries to move  ARGV[3] = most fields an entry keeps
-- Each member is a JSON object of the entry's string fields. Returns how many moved.
-- No member can fail the script (and so block the set): one with more fields than
-- ARGV[3] (Lua's unpack refuses a few thousand) is published with the contract's fields
-- only, plus `dropped_fields`, the number left out.
local most = tonumber(ARGV[3])
local contract = {'id', 'payload', 'attempt', 'traceparent', 'tracestate'}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
    local ok, fields = pcall(cjson.decode, member)
    local args, count = {}, 0
    if ok and type(fields) == 'table' then
        for k, v in pairs(fields) do
            count = count + 1
            if count <= most then
                args[#args + 1] = tostring(k)
                args[#args + 1] = tostring(v)
            end
        end
    end
    if count > most then
        args = {}
        for _, k in ipairs(contract) do
            if fields[k] ~= nil then
                args[#args + 1] = k
                args[#args + 1] = tostring(fields[k])
            end
        end
        local kept = #args / 2
        args[#args + 1] = 'dropped_fields'
        args[#args + 1] = tostring(count - kept)
    end
    if #args == 0 then
        -- Unreadable member: publish it as a payload so the worker dead-letters it visibly.
        args = {'payload', member, 'reason', 'undecodable delayed entry'}
    end
    redis.call('XADD', KEYS[2], '*', unpack(args))
    redis.call('ZREM', KEYS[1], member)
end
return #due
