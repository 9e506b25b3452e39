-- server_budget.lua: follow an API's own rate-limit headers. An answer to the call granted as
-- number `seq` (acquire.lua counts grants) says `remaining` calls are left until its window
-- resets in `reset` seconds: so, counting from that call, the fleet may be granted calls up to
-- number seq + remaining before then. Units: µs from Redis TIME; reset in seconds.
--
-- KEYS[1]  enricher:{<app_id>:<api>}:server_budget  hash: limit (the last grant number the
--          server allows in its window), reset_at (when the window resets, µs); TTL until then
-- KEYS[2]  enricher:{<app_id>:<api>}:granted        the grant counter (acquire.lua)
-- ARGV[1]  remaining calls (>= 0)   ARGV[2] seconds until the reset (> 0)
-- ARGV[3]  the grant number of the call that was answered; empty = unknown (the counter now)
--
-- Answers to concurrent calls arrive in any order, and calls granted after `seq` may already
-- have been counted by the server, so every answer gives an upper bound: while a budget of the
-- server's current window is known, only a tighter one replaces it; it lapses at its reset, and
-- the next answer starts the next window's. acquire.lua refuses calls past the limit until the
-- reset and paces the rest evenly over the time left (see its header).
-- Returns {limit, reset_at} in force.

local remaining, reset = tonumber(ARGV[1]), tonumber(ARGV[2])
if not (remaining and reset and remaining >= 0 and reset > 0) then
  return redis.error_reply("server_budget.lua needs remaining >= 0 and reset > 0")
end
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local seq = tonumber(ARGV[3]) or tonumber(redis.call("GET", KEYS[2]) or "0")
local limit, reset_at = seq + math.floor(remaining), now + math.ceil(reset * 1000000)

local known = redis.call("HMGET", KEYS[1], "limit", "reset_at")
local known_limit, known_reset = tonumber(known[1]), tonumber(known[2])
if known_limit and known_reset and known_reset > now and known_limit <= limit then
  return {known[1], known[2]}
end
local limit_text, reset_text = string.format("%.0f", limit), string.format("%.0f", reset_at)
redis.call("HSET", KEYS[1], "limit", limit_text, "reset_at", reset_text)
redis.call("PEXPIRE", KEYS[1], math.ceil(reset * 1000))
return {limit_text, reset_text}
