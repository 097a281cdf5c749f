-- A watch's read: marks the key watched (so that writers publish its new
-- versions and its deletion on the wake channel) for the mark's lifetime,
-- then reads value, version and creation stamp. Nothing is marked for a
-- context that does not exist.
-- KEYS: data, watched. ARGV: mark ms.
-- Returns {value, version, born}, each nil if absent (born is absent on
-- contexts written before creation stamps existed).
local r = redis.call('HMGET', KEYS[1], 'value', 'version', 'born')
if r[2] then redis.call('SET', KEYS[2], '1', 'PX', ARGV[1]) end
return r
