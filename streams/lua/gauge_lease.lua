-- Take, renew or give up the lease on reporting one queue's gauges, atomically: a replica
-- renews only a lease it still holds, and gives up only its own.
-- KEYS[1] = the lease key  ARGV[1] = holder (consumer name)  ARGV[2] = TTL in ms, 0 = give up
-- Returns 1 when ARGV[1] holds the lease after the call, else 0.
local holder = redis.call('GET', KEYS[1])
if tonumber(ARGV[2]) == 0 then
    if holder == ARGV[1] then
        redis.call('DEL', KEYS[1])
    end
    return 0
end
if holder == false or holder == ARGV[1] then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
