-- Drop a dead-letter stream's oldest entries until it uses at most ARGV[1] bytes, atomically:
-- a letter written between measuring and trimming would otherwise be dropped unmeasured.
-- KEYS[1] = the dead-letter stream  ARGV[1] = the byte cap
-- Returns {entries removed, bytes used before}. The cut is proportional to the excess,
-- repeated while the oldest entries turn out smaller than the average.
local cap = tonumber(ARGV[1])
local before = redis.call('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', '0')
if not before then
    return {0, 0}
end
local used, removed = before, 0
for _ = 1, 16 do
    if used <= cap then
        break
    end
    local n = redis.call('XLEN', KEYS[1])
    if n == 0 then
        break
    end
    local keep = math.min(math.floor(n * cap / used), n - 1)
    removed = removed + redis.call('XTRIM', KEYS[1], 'MAXLEN', keep)
    used = redis.call('MEMORY', 'USAGE', KEYS[1], 'SAMPLES', '0') or 0
end
return {removed, before}
