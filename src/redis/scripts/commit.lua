-- A guard's commit: writes and bumps the version if the lease is still ours
-- and the version the one we read; releases the lease and wakes waiters.
-- KEYS: data, lock, waiting, watched. ARGV: token, version as read, value,
-- wake channel, data key, publish command (PUBLISH, or SPUBLISH on a
-- cluster). Publishes the data key on the wake channel if a
-- waiter marked the key (waiting) or, for a new version, if a watcher did
-- (watched). Returns {1, new version}, {-1} if the lease is no
-- longer ours (nothing written), {-2, found version} if the version moved
-- (nothing written, lease released), {-3, 'version', found} if the stored
-- version is not a number (nothing written, lease released).
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {-1} end
local v = redis.call('HGET', KEYS[1], 'version')
local ok = (v == ARGV[2]) and (num(v) ~= nil)
if ok then
  redis.call('HSET', KEYS[1], 'value', ARGV[3])
  redis.call('HINCRBY', KEYS[1], 'version', 1)
end
redis.call('DEL', KEYS[2])
local wake = redis.call('DEL', KEYS[3]) == 1
if ok and not wake then wake = redis.call('EXISTS', KEYS[4]) == 1 end
if wake then redis.call(ARGV[#ARGV], ARGV[4], ARGV[5]) end
if ok then return {1, redis.call('HGET', KEYS[1], 'version')} end
if v and not num(v) then return {-3, 'version', v} end
return {-2, v or '0'}
