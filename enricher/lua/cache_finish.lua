-- cache_finish.lua: store a request's answer (unless the payload is empty), then free the
-- request's lease if it is still ours. Units: ARGV[3] is milliseconds.
--
-- KEYS[1]  <prefix>cache:<key>   the stored entry (see cache_lookup.lua)
-- KEYS[2]  <prefix>lease:<key>   random token of the worker calling the API for this request
-- ARGV[1]  this worker's token (random hex)
-- ARGV[2]  the entry to store as compact JSON; empty = store nothing (only free the lease)
-- ARGV[3]  how long to keep the entry (ms, >= 1): cache_ttl or cache_not_found_ttl
--
-- A lease that is no longer ours (it expired and another worker took it) is left alone.
-- Returns 1.

if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
