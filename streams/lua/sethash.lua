-- Write job hashes, moving forward only (DESIGN inv. 2, 9): an older delivery never
-- overwrites a newer one, and a terminal status is never overwritten.
-- KEYS = the job hashes. ARGV, per key: fence, rank, ttl (0: none), n, then n values
-- (field, value, ...). `fence` is a fixed-width digit string, so string order is numeric
-- order; `rank` orders the writes of one delivery (running 1, then its outcome 2).
-- Returns how many hashes were written.
local function write(key, fence, rank, ttl, first, last)
    local cur = redis.call('HMGET', key, 'fence', 'rank', 'status')
    if cur[3] == 'completed' or cur[3] == 'failed' or cur[3] == 'cancelled' then
        return 0
    end
    if cur[1] and (cur[1] > fence or (cur[1] == fence and (tonumber(cur[2]) or 0) >= rank)) then
        return 0
    end
    local args = {'fence', fence, 'rank', rank}
    for j = first, last do
        args[#args + 1] = ARGV[j]
    end
    redis.call('HSET', key, unpack(args))
    if ttl > 0 then
        redis.call('EXPIRE', key, ttl)
    end
    return 1
end

local a, written = 1, 0
for k = 1, #KEYS do
    local n = tonumber(ARGV[a + 3])
    -- one unusable key (not a hash) must not cost the others their view
    local ok, w = pcall(write, KEYS[k], ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]),
        a + 4, a + 3 + n)
    if ok then
        written = written + w
    end
    a = a + 4 + n
end
return written
