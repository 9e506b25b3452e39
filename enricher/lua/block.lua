-- block.lua: pause every worker's calls to one API until now + seconds (a server's Retry-After).
-- Units: times are integer microseconds since the Unix epoch from Redis TIME; ARGV[1] is seconds.
--
-- KEYS[1]  enricher:{<app_id>:<api>}:blocked   "blocked until", string of µs
-- ARGV[1]  seconds to block (float >= 0)
-- ARGV[2]  optional fake "now" in µs, for tests only; empty = Redis TIME
--
-- Stores max(existing, now + seconds), so a shorter Retry-After never shortens a longer block,
-- with a TTL a second past the end. Returns the resulting "blocked until" in µs.

local now
if ARGV[2] and ARGV[2] ~= "" then
  now = tonumber(ARGV[2])
else
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local blocked_until = now + math.ceil(tonumber(ARGV[1]) * 1000000)
local existing = tonumber(redis.call("GET", KEYS[1]) or "0")
if existing > blocked_until then blocked_until = existing end
if blocked_until > now then
  local ttl_ms = math.ceil((blocked_until - now) / 1000) + 1000
  redis.call("SET", KEYS[1], string.format("%.0f", blocked_until), "PX", ttl_ms)
end
return blocked_until
