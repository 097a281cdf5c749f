-- store_context: writes the value and bumps the version, unless a lease is
-- held.
-- KEYS: data, lock, waiting, floor, watched. ARGV: value, kind,
-- waiting-mark ms, wake channel, data key, publish command (PUBLISH, or
-- SPUBLISH on a cluster).
-- A context created here gets its creation stamp (field born: its first
-- version). Publishes the data key on the wake channel if a watcher marked
-- the key (watched).
-- Returns {1, new version}, {0, pttl} if held, {-3, 'floor', found} if the
-- kind's floor is not a number (nothing written).
--
-- A stored version that is not a number is repaired: the new version is
-- the server clock in microseconds (or the kind's floor if that is
-- higher), above any version the key can have reached by commits, so
-- versions still never repeat.
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
  return {0, redis.call('PTTL', KEYS[2])}
end
local v = redis.call('HGET', KEYS[1], 'version')
local created = not v
if (not v) or (not num(v)) then
  local f = redis.call('HGET', KEYS[4], ARGV[2])
  local base = 0
  if f then
    base = num(f)
    if not base then return {-3, 'floor', f} end
  end
  if v then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
    if now > base then base = now end
  end
  redis.call('HSET', KEYS[1], 'version', string.format('%.0f', base))
end
redis.call('HSET', KEYS[1], 'value', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'version', 1)
local nv = redis.call('HGET', KEYS[1], 'version')
if created then redis.call('HSET', KEYS[1], 'born', nv) end
if redis.call('EXISTS', KEYS[5]) == 1 then redis.call(ARGV[#ARGV], ARGV[4], ARGV[5]) end
return {1, nv}
