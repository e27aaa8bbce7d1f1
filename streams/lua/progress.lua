-- Write the latest progress of running jobs into their hashes (DESIGN inv. 2, 9).
-- KEYS = the job hashes. ARGV, per key: fence, fraction, note, time (ISO-8601 UTC).
-- A value is written only while the hash shows this very delivery `running`: progress of
-- a delivery taken over since, or of an attempt already over, changes nothing.
-- Returns how many hashes were written.
local written = 0
for k = 1, #KEYS do
    local a = (k - 1) * 4
    local ok, cur = pcall(redis.call, 'HMGET', KEYS[k], 'fence', 'status')
    if ok and cur[2] == 'running' and cur[1] == ARGV[a + 1] then
        redis.call('HSET', KEYS[k], 'progress', ARGV[a + 2], 'progress_note', ARGV[a + 3],
            'progress_at', ARGV[a + 4])
        written = written + 1
    end
end
return written
