-- Cancel a job of one queue, atomically (one slot): tell every worker, take it out of the
-- delayed set, and delete its stream entries that no consumer was given yet.
-- KEYS[1] = jobs:{q}:cancels, then per priority level (one for a queue without levels) its
-- delayed set and its stream: KEYS[2] = jobs:{q}:delayed, KEYS[3] = jobs:{q}, ...
-- ARGV[1] = group  ARGV[2] = job id  ARGV[3] = cancels kept (MAXLEN ~)  ARGV[4] = now (ms)
-- ARGV[5] = n, then n pairs (level number from 1, delayed member); then pairs (level
-- number, entry id).
-- Returns {removed, consumer holding an entry or false, entries already acked}.
-- An entry delivered to a consumer is left to it: the request in KEYS[1] makes its worker
-- cancel the handler cooperatively (or not start it).
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'id', ARGV[2], 'at', ARGV[4])
local removed, holder, done = 0, false, 0
local n = tonumber(ARGV[5])
for i = 6, 5 + 2 * n, 2 do
    removed = removed + redis.call('ZREM', KEYS[2 * tonumber(ARGV[i])], ARGV[i + 1])
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
for i = 6 + 2 * n, #ARGV, 2 do
    local stream = KEYS[1 + 2 * tonumber(ARGV[i])]
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
