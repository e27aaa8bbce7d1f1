-- Settle the outcomes of one queue atomically, fenced by ownership (DESIGN inv. 1, 9, 10).
-- KEYS[1] = jobs:{q}  KEYS[2] = jobs:{q}:delayed  KEYS[3] = jobs:{q}:dead  (one slot)
-- ARGV[1] = group  ARGV[2] = consumer
-- then five values per outcome: entry id, delivery count, kind, score, data
--   kind 'a': ack only; 'r': retry, ZADD data (the retry entry as JSON) at score (due ms);
--   'd': dead letter, XADD the fields of data (a JSON array k1, v1, k2, v2, ...)
-- An outcome takes effect only while its entry is pending for this consumer with the same
-- delivery count: a paused replica whose entry was taken over changes nothing, and a
-- re-sent call (reply lost) finds its entries acked and adds no second retry or letter.
-- Returns one code per outcome: 1 settled, 0 pending for another consumer, 2 pending for
-- no one (acked: by a new holder, or by this very call sent before with its reply lost),
-- minus the delivery count when ours but delivered again since, or an error text (kept
-- unacked, tried again).
local stream, group, me = KEYS[1], ARGV[1], ARGV[2]
local codes, acks = {}, {}
for i = 3, #ARGV, 5 do
    local id, delivery, kind = ARGV[i], tonumber(ARGV[i + 1]), ARGV[i + 2]
    local held = redis.call('XPENDING', stream, group, id, id, 1)
    local code
    if #held == 0 then
        code = 2
    elseif held[1][2] ~= me then
        code = 0
    elseif tonumber(held[1][4]) ~= delivery then
        code = -tonumber(held[1][4])
    else
        local ok, err = true, nil
        if kind == 'r' then
            ok, err = pcall(redis.call, 'ZADD', KEYS[2], ARGV[i + 3], ARGV[i + 4])
        elseif kind == 'd' then
            local decoded, fields = pcall(cjson.decode, ARGV[i + 4])
            if not decoded or type(fields) ~= 'table' or #fields < 2 then
                fields = {'error', 'dead letter fields unreadable', 'entry_id', id}
            end
            ok, err = pcall(function() return redis.call('XADD', KEYS[3], '*', unpack(fields)) end)
        end
        if ok then
            acks[#acks + 1] = id
            code = 1
        else
            code = type(err) == 'table' and tostring(err.err) or tostring(err)
        end
    end
    codes[#codes + 1] = code
end
for i = 1, #acks, 1000 do
    redis.call('XACK', stream, group, unpack(acks, i, math.min(i + 999, #acks)))
end
return codes
