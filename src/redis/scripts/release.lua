-- Gives a lease back (token-checked, so it is always safe to send) and
-- wakes waiters.
-- KEYS: lock, waiting. ARGV: token, wake channel, data key, publish
-- command (PUBLISH, or SPUBLISH on a cluster). Returns 1 if
-- the lease was ours and is released.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('DEL', KEYS[2]) == 1 then redis.call(ARGV[#ARGV], ARGV[2], ARGV[3]) end
return 1
