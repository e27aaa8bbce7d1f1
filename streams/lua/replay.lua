-- Republish one dead letter to its queue and delete the letter, atomically: a replay
-- leaves either the letter or the new entry, never both (and never neither).
-- KEYS[1] = jobs:{q}:dead  KEYS[2] = jobs:{q}  (same hash tag: one slot)
-- ARGV[1] = the letter's id in the dead stream; ARGV[2..] = field, value, ... of the entry
-- Returns the new entry's id, or false when the letter is gone (replayed or purged).
-- XADD comes first: a script that fails half-way keeps what it wrote, and losing the
-- letter would be worse than keeping it.
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then
    return false
end
local entry = redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], ARGV[1])
return entry
