-- circuit_check.lua: one API's circuit breaker as a worker about to call it sees it; once the
-- cool-down is over (half-open), the first worker to ask takes the probe's lease (SET NX).
-- Units: times are integer microseconds from Redis TIME; the lease is milliseconds.
--
-- KEYS[1]  enricher:{<app_id>:<api>}:circuit:open      present while open: the cool-down's end, µs
-- KEYS[2]  enricher:{<app_id>:<api>}:circuit:failures  consecutive failed attempts
-- KEYS[3]  enricher:{<app_id>:<api>}:circuit:probe     the probe's lease: its token
-- ARGV[1]  the lease (ms): how long one probe may take before another worker may probe
-- ARGV[2]  the token this caller's probe would hold
--
-- Returns {state, wait_us, failures}, state one of
--   "closed"   call as usual
--   "open"     hold: the cool-down ends in wait_us
--   "probe"    the cool-down is over and this caller holds the lease: it makes the one probe call
--   "probing"  another caller's probe is under way; its lease ends in wait_us at the latest

local failures = tonumber(redis.call("GET", KEYS[2]) or "0")
local open = redis.call("GET", KEYS[1])
if not open then return {"closed", 0, failures} end
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cool_down_end = tonumber(open)
if cool_down_end > now then return {"open", cool_down_end - now, failures} end
if redis.call("SET", KEYS[3], ARGV[2], "NX", "PX", tonumber(ARGV[1])) then
  return {"probe", 0, failures}
end
return {"probing", math.max(0, redis.call("PTTL", KEYS[3])) * 1000, failures}
