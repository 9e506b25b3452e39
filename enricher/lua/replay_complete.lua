-- replay_complete.lua: not a script on its own; replay.py prepends it to replay_outcome.lua and
-- replay_transition.lua, which both call complete(). Units: none here (counts of events; the
-- finished_at it writes is Unix seconds from Redis TIME).
--
-- complete(key): key is the replay hash (enricher:{<app_id>}:replay:<id>). A replay is done when
-- its outcomes (outputs + dead_letters + dropped + cancelled_events) reach `selected` while it is
-- running or held; both scripts check it, so whichever comes last (the final outcome, or the end
-- of feeding) closes the replay: state becomes 'done' and finished_at is set.
-- Returns the outcomes total.

local function complete(key)
  local v = redis.call('HMGET', key, 'state', 'selected', 'outputs', 'dead_letters', 'dropped',
                       'cancelled_events')
  local total = (tonumber(v[3]) or 0) + (tonumber(v[4]) or 0) + (tonumber(v[5]) or 0)
                + (tonumber(v[6]) or 0)
  if (v[1] == 'running' or v[1] == 'held') and total >= (tonumber(v[2]) or 0) then
    local now = redis.call('TIME')
    redis.call('HSET', key, 'state', 'done', 'finished_at', now[1])
  end
  return total
end
