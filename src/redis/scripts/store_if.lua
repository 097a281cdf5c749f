-- store_context_if: writes the value and bumps the version only if the
-- committed version is the expected one (0: only if absent), unless a lease
-- is held.
-- KEYS: data, lock, waiting, floor, watched. ARGV: value, kind,
-- waiting-mark ms, expected version (decimal), wake channel, data key,
-- publish command (PUBLISH, or SPUBLISH on a cluster).
-- A context created here gets its creation stamp (field born: its first
-- version). A write publishes the data key on the wake channel if a
-- watcher marked the key (watched); a refusal publishes nothing.
-- Returns {1, new version}, {0, pttl} if held, {-1} if absent (expected not
-- 0), {2, found} if the committed version differs (nothing written),
-- {-3, 'version' | 'floor', found} if a number is corrupt (nothing
-- written).
--
-- A create starts above the kind's floor, as store.lua does, so a
-- recreated context's versions never repeat.
if redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[3])
  return {0, redis.call('PTTL', KEYS[2])}
end
local v = redis.call('HGET', KEYS[1], 'version')
if not v then
  if ARGV[4] ~= '0' then return {-1} end
  local f = redis.call('HGET', KEYS[4], ARGV[2])
  local base = 0
  if f then
    base = num(f)
    if not base then return {-3, 'floor', f} end
  end
  redis.call('HSET', KEYS[1], 'value', ARGV[1], 'version', string.format('%.0f', base))
  redis.call('HINCRBY', KEYS[1], 'version', 1)
  local nv = redis.call('HGET', KEYS[1], 'version')
  redis.call('HSET', KEYS[1], 'born', nv)
  if redis.call('EXISTS', KEYS[5]) == 1 then redis.call(ARGV[#ARGV], ARGV[5], ARGV[6]) end
  return {1, nv}
end
if not num(v) then return {-3, 'version', v} end
-- Compared as canonical decimal text: exact for every version.
local canon = string.gsub(v, '^0+(%d)', '%1')
if canon ~= ARGV[4] then return {2, v} end
redis.call('HSET', KEYS[1], 'value', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'version', 1)
if redis.call('EXISTS', KEYS[5]) == 1 then redis.call(ARGV[#ARGV], ARGV[5], ARGV[6]) end
return {1, redis.call('HGET', KEYS[1], 'version')}
