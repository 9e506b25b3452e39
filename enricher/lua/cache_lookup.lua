-- cache_lookup.lua: the stored answer to one request, else take the request's lease if it is free.
-- Units: ARGV[2] is milliseconds. Keys are those of RedisResponseCache (see redis_cache.py), with
-- <prefix> = "enricher:{<app_id>:<api>}:", the limiter's hash tag (one Redis Cluster slot).
--
-- KEYS[1]  <prefix>cache:<key>   the stored entry: {"body": <answer>} or {"status": 404}
-- KEYS[2]  <prefix>lease:<key>   random token of the worker calling the API for this request
-- ARGV[1]  this worker's token (random hex)
-- ARGV[2]  lease length (ms, >= 1)
--
-- Returns {answer, 0} when an entry is stored (the caller decodes it); {false, 1} when the lease
-- was free and is now ours (we call); {false, 0} when another worker holds the lease (we poll).

local answer = redis.call('GET', KEYS[1])
if answer then return {answer, 0} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {false, 1} end
return {false, 0}
