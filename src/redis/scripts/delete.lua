-- delete_context: deletes the context and raises its kind's version floor
-- to its last version, unless a lease is held.
-- KEYS: data, lock, waiting, floor, watched. ARGV: kind, waiting-mark ms,
-- wake channel, data key, publish command (PUBLISH, or SPUBLISH on a
-- cluster). A delete publishes the data key on the wake
-- channel if a watcher marked the key (watched).
-- Returns {1} when deleted, {0, pttl} if held, {-1} if absent,
-- {-3, 'version' | 'floor', found} if a number is corrupt (nothing
-- written: a corrupt version never reaches the floor).
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
  return {0, redis.call('PTTL', KEYS[2])}
end
local v = redis.call('HGET', KEYS[1], 'version')
if not v then return {-1} end
local n = num(v)
if not n then return {-3, 'version', v} end
local f = redis.call('HGET', KEYS[4], ARGV[1])
if f and not num(f) then return {-3, 'floor', f} end
if (not f) or num(f) < n then redis.call('HSET', KEYS[4], ARGV[1], v) end
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[5]) == 1 then redis.call(ARGV[#ARGV], ARGV[3], ARGV[4]) end
return {1}
