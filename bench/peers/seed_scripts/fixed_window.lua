-- The seed's fixed window counter, verbatim: RATE_LIMIT_SCRIPT of section 7 ("Race Condition
-- Handling", "Solution: Lua Scripts (Atomic Operations)") of
-- shared/seed/rate-limiter-design.md. The seed's design, in which each application server calls
-- this script in Redis for every request (EVALSHA), is the baseline of scripts/bench-redis.
-- KEYS[1]: the counter key (the seed uses "ratelimit:<client key>")
-- ARGV[1]: limit; ARGV[2]: window in seconds
-- Returns {allowed (1/0), remaining, TTL of the key in seconds}.
local key = KEYS[1]
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])

-- Atomic increment
local current = redis.call('INCR', key)

-- Set expiry only on first request
if current == 1 then
    redis.call('EXPIRE', key, window)
end

-- Check limit
if current > limit then
    return {0, 0, redis.call('TTL', key)}  -- denied
else
    return {1, limit - current, redis.call('TTL', key)}  -- allowed
end
