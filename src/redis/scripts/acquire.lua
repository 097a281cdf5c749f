-- Takes the lease if nobody holds it, and reads value and version.
-- KEYS: data, lock, waiting. ARGV: token, lease ms, waiting-mark ms (0: do
-- not mark). Returns {1, version, value}, {0, pttl} if held, {-1} if the
-- context does not exist, {-3, 'version', found} if the stored version is
-- not a number (no lock is taken in either case).
if redis.call('EXISTS', KEYS[2]) == 1 then
  if ARGV[3] ~= '0' then redis.call('SET', KEYS[3], '1', 'PX', ARGV[3]) end
  return {0, redis.call('PTTL', KEYS[2])}
end
local r = redis.call('HMGET', KEYS[1], 'value', 'version')
if not r[2] then return {-1} end
if not num(r[2]) then return {-3, 'version', r[2]} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {1, r[2], r[1] or ''}
