-- serve_put.lua: store a key's served state unless a newer input's state is already there.
-- Units: ARGV[5] is milliseconds.
--
-- KEYS[1]  enricher:<app_id>:served:{<key>}   hash: topic, partition, offset, value
-- ARGV[1]  input topic of the output's source record
-- ARGV[2]  its partition
-- ARGV[3]  its offset
-- ARGV[4]  the output record's value
-- ARGV[5]  how long to keep the entry after this update (ms, >= 1)
--
-- "Newer" (enricher/serving.py, replaces()): no entry, another topic or partition, or an offset
-- at least the stored one. Returns 1 when stored, 0 when an older input was ignored.

local current = redis.call('HMGET', KEYS[1], 'topic', 'partition', 'offset')
if current[1] == ARGV[1] and current[2] == ARGV[2]
    and tonumber(current[3]) > tonumber(ARGV[3]) then
  return 0
end
redis.call('HSET', KEYS[1], 'topic', ARGV[1], 'partition', ARGV[2], 'offset', ARGV[3],
           'value', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
