-- cache_renew.lua: extend a request's lease while our API call runs, if it is still ours.
-- Units: ARGV[2] is milliseconds.
--
-- KEYS[1]  <prefix>lease:<key>   random token of the worker calling the API for this request
-- ARGV[1]  this worker's token (random hex)
-- ARGV[2]  new lease length from now (ms, >= 1)
--
-- Returns 1 if the lease was extended, 0 if it is gone or another worker's.

if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
