-- Reset the idle time of entries this consumer still holds, so the safety ceiling never
-- takes a live replica's long job; an entry another consumer took meanwhile is left alone
-- (a paused replica must not take back what was reclaimed from it, inv. 9).
-- KEYS[1] = jobs:{q}  ARGV[1] = group  ARGV[2] = consumer, then entry ids.
-- Returns how many were refreshed.
local n = 0
for i = 3, #ARGV do
    local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
    if #held > 0 and held[1][2] == ARGV[2] then
        redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
        n = n + 1
    end
end
return n
