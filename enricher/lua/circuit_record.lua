-- circuit_record.lua: one attempt's outcome for one API's circuit breaker, shared by all workers.
-- Units: times are integer microseconds from Redis TIME; TTLs are milliseconds.
--
-- KEYS[1..3]  circuit:open, circuit:failures, circuit:probe (see circuit_check.lua)
-- ARGV[1]  "success" (the API answered), "failure" (no valid answer, or a 5xx) or "release"
--          (a probe that ended without a verdict gives its lease back)
-- ARGV[2]  consecutive failures that open the circuit (>= 1)
-- ARGV[3]  the cool-down (µs)
-- ARGV[4]  the probe's token ("" when the attempt was not the probe)
-- ARGV[5]  TTL of the failure count (ms), renewed by every failure: a long quiet spell forgets it
-- ARGV[6]  how long the open key outlives its cool-down (ms): if no worker probes by then (no
--          traffic), the circuit closes by itself
--
--   success: the circuit closes (all three keys go), whoever answered: the API is up.
--   failure of the probe (its token still holds the lease): the circuit opens for another cool-down.
--   any other failure: counted; at ARGV[2] in a row the circuit opens (unless it is already).
-- Returns {state, wait_us, failures, changed}: state "closed" or "open", wait_us until the
-- cool-down ends (0 when closed or half-open), changed 1 when this outcome opened or closed it.

local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cool_down = tonumber(ARGV[3])
local open = redis.call("GET", KEYS[1])

local function open_circuit()
  local ttl = math.ceil(cool_down / 1000) + tonumber(ARGV[6])
  redis.call("SET", KEYS[1], string.format("%.0f", now + cool_down), "PX", ttl)
  redis.call("DEL", KEYS[3])
end

if ARGV[1] == "success" then
  redis.call("DEL", KEYS[1], KEYS[2], KEYS[3])
  return {"closed", 0, 0, open and 1 or 0}
end

local is_probe = ARGV[4] ~= "" and redis.call("GET", KEYS[3]) == ARGV[4]
if ARGV[1] == "release" then
  if is_probe then redis.call("DEL", KEYS[3]) end
elseif is_probe then
  open_circuit()
  return {"open", cool_down, tonumber(redis.call("GET", KEYS[2]) or "0"), 1}
else
  local failures = redis.call("INCR", KEYS[2])
  redis.call("PEXPIRE", KEYS[2], tonumber(ARGV[5]))
  if not open and failures >= tonumber(ARGV[2]) then
    open_circuit()
    return {"open", cool_down, failures, 1}
  end
end
local failures = tonumber(redis.call("GET", KEYS[2]) or "0")
if not open then return {"closed", 0, failures, 0} end
return {"open", math.max(0, tonumber(open) - now), failures, 0}
