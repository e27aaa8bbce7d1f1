-- Take a cancelled job out of the streams of one slot: out of their delayed sets, and
-- delete its stream entries that no consumer was given yet. The request itself was
-- appended to the queue's stream of cancellations before (`cancel_job`): a script touches
-- one slot, and a partitioned queue's partitions are each their own slot.
-- KEYS, per priority level or partition of this slot: its delayed set, then its stream
-- (KEYS[1] = jobs:{q}:delayed, KEYS[2] = jobs:{q}, ...).
-- ARGV[1] = group  ARGV[2] = job id  ARGV[3] = n, then n pairs (name number from 1,
-- delayed member); then pairs (name number, entry id).
-- Returns {removed, consumer holding an entry or false, entries already acked}.
-- An entry delivered to a consumer is left to it: the request makes its worker cancel the
-- handler cooperatively (or not start it).
local removed, holder, done = 0, false, 0
local n = tonumber(ARGV[3])
for i = 4, 3 + 2 * n, 2 do
    removed = removed + redis.call('ZREM', KEYS[2 * tonumber(ARGV[i]) - 1], ARGV[i + 1])
end

local function parse(id)
    local ms, seq = string.match(id, '^(%d+)-(%d+)$')
    return tonumber(ms) or 0, tonumber(seq) or 0
end

local function after(a, b) -- entry id a is newer than b
    local am, as = parse(a)
    local bm, bs = parse(b)
    return am > bm or (am == bm and as > bs)
end

local delivered = {}
for i = 4 + 2 * n, #ARGV, 2 do
    local stream = KEYS[2 * tonumber(ARGV[i])]
    local id = ARGV[i + 1]
    local ok, held = pcall(redis.call, 'XPENDING', stream, ARGV[1], id, id, 1)
    if not ok then
        held = {}  -- no consumer group yet: nothing was delivered
    end
    if #held > 0 then
        holder = held[1][2]
    else
        if delivered[stream] == nil then
            delivered[stream] = '0-0'
            local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
            if ok then
                for _, g in ipairs(groups) do
                    local info = {}
                    for j = 1, #g, 2 do
                        info[g[j]] = g[j + 1]
                    end
                    if info['name'] == ARGV[1] then
                        delivered[stream] = info['last-delivered-id']
                    end
                end
            end
        end
        if after(id, delivered[stream]) then
            removed = removed + redis.call('XDEL', stream, id)
        else
            done = done + 1
        end
    end
end
return {removed, holder, done}
