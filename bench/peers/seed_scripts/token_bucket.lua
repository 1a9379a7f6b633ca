-- The seed's token bucket, verbatim: the Lua script of "Algorithm 4: Token Bucket" in
-- section 2 ("Rate Limiting Algorithms") of shared/seed/rate-limiter-design.md
-- (TokenBucket.is_allowed, which EVALs it for every request).
-- KEYS[1]: the bucket key (the seed uses "tokenbucket:<client key>")
-- ARGV[1]: capacity; ARGV[2]: refill rate in tokens per second; ARGV[3]: now, in seconds
--          (the caller's clock, time.time(), a float)
-- Returns 1 (allowed) or 0 (rejected). The bucket is a hash {tokens, last_update} kept 1 h.
local key = KEYS[1]
local capacity = tonumber(ARGV[1])
local refill_rate = tonumber(ARGV[2])
local now = tonumber(ARGV[3])

local data = redis.call('HMGET', key, 'tokens', 'last_update')
local tokens = tonumber(data[1]) or capacity
local last_update = tonumber(data[2]) or now

-- Calculate tokens to add
local elapsed = now - last_update
local new_tokens = math.min(capacity, tokens + elapsed * refill_rate)

-- Try to consume token
if new_tokens >= 1 then
    new_tokens = new_tokens - 1
    redis.call('HMSET', key, 'tokens', new_tokens, 'last_update', now)
    redis.call('EXPIRE', key, 3600)
    return 1
else
    return 0
end
