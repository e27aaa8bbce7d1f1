-- Claim entries from the consumer that holds them now, atomically: an entry another
-- replica took meanwhile (or acked) is left alone, so a claim never takes an entry back
-- from its new holder.
-- KEYS[1] = the stream  ARGV[1] = group  ARGV[2] = current holder  ARGV[3] = new holder
-- ARGV[4] = 'JUSTID' to only reset the idle time (delivery count unchanged), else ''
-- ARGV[5..] = entry ids
-- Returns what XCLAIM returns for the entries claimed ([id, fields] each, or ids).
-- Entries deleted from the stream are dropped from the pending list by XCLAIM itself.
local claimed = {}
for i = 5, #ARGV do
    local held = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
    if #held > 0 and held[1][2] == ARGV[2] then
        local got
        if ARGV[4] == 'JUSTID' then
            got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[i], 'JUSTID')
        else
            got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[i])
        end
        if got[1] then
            claimed[#claimed + 1] = got[1]
        end
    end
end
return claimed
