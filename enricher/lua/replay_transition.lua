-- replay_transition.lua: move a replay to a new state if it is in one of the given states (and
-- set its note), then close it if every outcome is in. Units: ARGV[1] is seconds.
-- complete() comes from replay_complete.lua, prepended by replay.py.
--
-- KEYS[1]  enricher:{<app_id>}:replay:<id>   the replay hash
-- ARGV[1]  TTL of the replay hash (s), renewed here (also when the state does not change)
-- ARGV[2]  the new state
-- ARGV[3]  the states it may leave, space-separated
-- ARGV[4]  a note
-- ARGV[5]  '1' to set the note to ARGV[4], else the note is kept
--
-- Returns the state afterwards, false (nil reply) when there is no such replay.

local current = redis.call('HGET', KEYS[1], 'state')
if not current then return false end
if string.find(' ' .. ARGV[3] .. ' ', ' ' .. current .. ' ', 1, true) then
  redis.call('HSET', KEYS[1], 'state', ARGV[2])
  if ARGV[5] == '1' then redis.call('HSET', KEYS[1], 'note', ARGV[4]) end
  complete(KEYS[1])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return redis.call('HGET', KEYS[1], 'state')
