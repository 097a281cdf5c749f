-- Extends a lease that is still ours.
-- KEYS: lock. ARGV: token, lease ms. Returns 1 if the lease was still ours
-- and is extended; 0 if it expired or was taken (never re-created).
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
