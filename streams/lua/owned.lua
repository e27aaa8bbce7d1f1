#!lua flags=no-writes
-- Which entries of one queue are still pending for this consumer with the delivery count
-- it holds (read-only). Asked before writing PostgreSQL when this replica's liveness may
-- have lapsed (a pause), so that a stale attempt writes nothing anywhere (DESIGN inv. 9).
-- KEYS[1] = jobs:{q}  ARGV[1] = group  ARGV[2] = consumer, then entry id, delivery pairs.
-- Returns one code per pair: 1 ours, 0 not ours, minus the delivery count when ours but
-- delivered again since.
local codes = {}
for i = 3, #ARGV, 2 do
    local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
    if #held == 0 or held[1][2] ~= ARGV[2] then
        codes[#codes + 1] = 0
    elseif tonumber(held[1][4]) ~= tonumber(ARGV[i + 1]) then
        codes[#codes + 1] = -tonumber(held[1][4])
    else
        codes[#codes + 1] = 1
    end
end
return codes
