-- replay_outcome.lua: count replayed events that ended with one outcome, and close the replay if
-- that was the last one. Units: ARGV[1] is seconds; ARGV[3] is a count of events.
-- complete() comes from replay_complete.lua, prepended by replay.py.
--
-- KEYS[1]  enricher:{<app_id>}:replay:<id>   the replay hash
-- ARGV[1]  TTL of the replay hash (s), renewed here
-- ARGV[2]  the outcome field: outputs, dead_letters, dropped or cancelled_events
-- ARGV[3]  how many events (integer >= 1)
--
-- Returns the outcomes total afterwards, -1 when there is no such replay (nothing is written).

if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HINCRBY', KEYS[1], ARGV[2], tonumber(ARGV[3]))
local total = complete(KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return total
