-- sluice.lua: Sluice's rate limiting decision inside Redis, for all the limits of one
-- request in one atomic call (EVALSHA). It is the twin of the C++ algorithms in src/algo
-- and of MemoryStore::CheckAll: for the same state history and the same times it returns
-- the same decisions, to the microsecond. src/store/redis/script_test.cc runs both on the
-- same random traces and keeps them in agreement: change them together.
--
-- Numbers here are Lua 5.1 doubles, exact for integers below 2^53. Times are microseconds
-- since 1970 (below 2^52 until 2112) and Sluice uses a Redis store only for policies that
-- script.h's ScriptExact accepts (counts below 2^52, products below 2^53, a state's times
-- below 2^53), so every product below is exact, or is compared with a bound below 2^53 that
-- it exceeds anyway (rounding is monotone), or is split (mul_div_ceil); every floor or ceil
-- of a quotient of integers below 2^53 is exact. The C++ side clamps costs to [0, 2^52]: a
-- cost above a limit's capacity is decided the same whatever its size.
--
-- KEYS[i]  the state of limit i; repeated keys are one limit checked twice (costs add up)
-- ARGV[1]  now in microseconds, or "" to use Redis' TIME (production: one clock for all)
-- ARGV[5i-3 .. 5i+1]  limit i: algorithm code, three compiled numbers, cost
--   0 fixed_window            limit, window, 0
--   1 sliding_window_log      limit, window, 0
--   2 sliding_window_counter  limit, window, 0
--   3 token_bucket            capacity, cycle, cycle_tokens (TokenBucket::Compile)
--   4 gcra                    burst, interval, tolerance (Gcra::Compile)
--   5 leaky_queue             burst, interval, tolerance
-- Returns per limit: allowed (0/1), limit, remaining, reset_after, retry_after, delay
-- (-1 for kNever), then the `now` used.
--
-- All or nothing (MemoryStore::CheckAll): every limit is decided without spending; only if
-- all admit is each one's new state written; otherwise nothing is written and the limits
-- that would have admitted report a peek (cost 0) of their state, as admitted.
--
-- State: one string per key, a tag byte and doubles (struct), written with SET only when
-- something is spent, expiring when the algorithm's ExpiresAt says the state is back to
-- fresh: PXAT in Redis' clock (rounded up to the millisecond). With an explicit now (tests)
-- the key expires ExpiresAt - now plus a minute from Redis' present: the test's clock and
-- Redis' are unrelated, and the minute keeps a trace's state from expiring in real time
-- while the trace's own clock stands still or steps back. The one state kept without expiry
-- is a token bucket that never refills (a lifetime quota: ExpiresAt is never).

-- Costs matter: the script runs once per request and Redis runs one script at a time. Each
-- call creates the script's closures anew, so there are two (decide, mul_div_ceil) and
-- constants are literals: -1 never, 2^53 = 9007199254740992, 2^32 = 4294967296,
-- 2^31 = 2147483648, 60000 the test grace in ms. One limit (the common case) takes a path
-- with one GET and no bookkeeping tables; several take one MGET. A call that spends writes
-- one SET per changed key; a rejection or a peek writes nothing.

local pack, read, byte, sub = struct.pack, struct.unpack, string.byte, string.sub
local floor, ceil = math.floor, math.ceil

-- ceil(a * b / c) for a, b >= 0, c > 0, exact when b * c < 2^53 even if a * b is not.
local function mul_div_ceil(a, b, c)
  local p = a * b
  if p < 9007199254740992 then return ceil(p / c) end
  local q = floor(a / c)
  return q * b + ceil((a - q * c) * b / c)
end

-- One limit: (algorithm code, state string or false/nil, its three numbers, now, cost) ->
-- allowed, remaining, reset_after, retry_after, delay, and when it spends: the new state and
-- when it expires (nil: never).
local function decide(code, s, a, b, c, now, cost)
  local units = cost > 1 and cost or 1  -- a peek asks about one unit

  if code == 2 then
    -- sliding_window_counter.cc (limit a, window b). State: 'c', low 32 bits of the window
    -- index, curr, prev.
    local index = floor(now / b)
    local t, curr, prev = now, 0, 0
    if s and #s == 25 and byte(s) == 99 then
      local low, sc, sp = read('<ddd', s, 2)
      local delta = (low - index) % 4294967296  -- RebuildIndex: the index nearest to now's
      if delta >= 2147483648 then delta = delta - 4294967296 end
      if delta > 0 then  -- time went backwards
        index = index + delta
        t, curr, prev = index * b, sc, sp
      elseif delta == 0 then
        curr, prev = sc, sp
      elseif delta == -1 then
        prev = sc
      end
    end
    local to_end = b - (t - index * b)
    local prev_part = prev * to_end
    local cap = a * b
    local allowed = units <= a and prev_part + (curr + units) * b <= cap
    local after = curr
    if allowed then after = curr + cost end
    local remaining = 0
    if prev_part + (after + 1) * b <= cap then
      remaining = a - after - ceil(prev_part / b)
      if remaining < 0 then remaining = 0 end
    end
    local ahead = t - now
    local reset = 0
    if after > 0 then
      reset = ahead + to_end + b
    elseif prev > 0 then
      reset = ahead + to_end
    end
    if allowed then
      if cost > 0 then
        return true, remaining, reset, 0, 0, pack('<Bddd', 99, index % 4294967296, after, prev),
          (index + 2) * b
      end
      return true, remaining, reset, 0, 0
    end
    if units > a then return false, remaining, reset, -1, 0 end
    local slack = (a - curr - units) * b
    if slack >= 0 and prev > 0 then
      local x = to_end - floor(slack / prev)
      if x < to_end then return false, remaining, reset, ahead + (x > 1 and x or 1), 0 end
    end
    local y = 0
    if curr > 0 then
      y = b - floor((a - units) * b / curr)
      if y < 0 then y = 0 elseif y > b then y = b end
    end
    return false, remaining, reset, ahead + to_end + y, 0

  elseif code >= 4 then
    -- gcra.cc, leaky_queue.cc (code 5: reports the delay) (burst a, interval b, tolerance
    -- c). State: 'g', TAT.
    if b == 0 then return false, 0, 0, -1, 0 end  -- limit or burst 0: nothing ever passes
    local start = now
    if s and #s == 9 and byte(s) == 103 then
      local tat = read('<d', s, 2)
      if tat > now then start = tat end
    end
    local backlog = start - now
    local retry = -1
    if units <= a then
      -- backlog + units * T <= tolerance, without a sum that may pass 2^53 after a step back
      local room = c - units * b
      if backlog <= room then
        if cost > 0 then
          local after = backlog + units * b
          local tat = now + after
          return true, floor((c - after) / b), after, 0, code == 5 and backlog or 0,
            pack('<Bd', 103, tat), tat
        end
        retry = 0
      else
        retry = backlog - room
      end
    end
    local remaining = 0
    if backlog < c then remaining = floor((c - backlog) / b) end
    return retry == 0, remaining, backlog, retry, 0

  elseif code == 3 then
    -- token_bucket.cc (capacity a, cycle b, cycle_tokens c: the refill is c tokens every b
    -- us, 0 for none). State: 't', base, anchor.
    local base, anchor, partial, t = a, now, 0, now
    if s and #s == 17 and byte(s) == 116 then
      local sb, sa = read('<dd', s, 2)
      if sa > now then t = sa end
      anchor = t
      if c == 0 then
        if sb < a then base = sb end
      else
        local elapsed = t - sa
        local cycles = floor(elapsed / b)
        partial = floor((elapsed - cycles * b) * c / b)
        if cycles * c + partial >= a - sb then  -- full
          partial = 0
        else
          base, anchor = sb + cycles * c, sa + cycles * b
        end
      end
    end
    local tokens = base + partial
    local allowed
    if cost == 0 then allowed = tokens >= 1 else allowed = cost <= tokens end
    local st, expires
    if allowed and cost > 0 then
      base, tokens = base - cost, tokens - cost
      st = pack('<Bdd', 116, base, anchor)
      if c > 0 then expires = anchor + mul_div_ceil(a - base, b, c) end
    end
    local ahead = t - now
    local remaining = tokens > 0 and tokens or 0
    -- TimeToReach(capacity), then TimeToReach(units): from t until that many tokens.
    local reset = 0
    if tokens < a then
      if c == 0 then
        reset = -1
      else
        reset = anchor + mul_div_ceil(a - base, b, c) - now
      end
    end
    if allowed then return true, remaining, reset, 0, 0, st, expires end
    if units > a or c == 0 then return false, remaining, reset, -1, 0 end
    return false, remaining, reset, anchor + mul_div_ceil(units - base, b, c) - now, 0

  elseif code == 0 then
    -- fixed_window.cc (limit a, window b). State: 'f', window start, count.
    local start = now - now % b
    local count = 0
    if s and #s == 17 and byte(s) == 102 then
      local ws, sc = read('<dd', s, 2)
      if ws >= start then start, count = ws, sc end
    end
    local e = start + b
    local left = a - count
    if left < 0 then left = 0 end
    if cost <= left and cost > 0 then
      return true, left - cost, e - now, 0, 0, pack('<Bdd', 102, start, count + cost), e
    end
    local reset = 0
    if count > 0 then reset = e - now end
    if units <= left then return true, left, reset, 0, 0 end
    if units > a then return false, left, reset, -1, 0 end
    return false, left, reset, e - now, 0
  end

  -- sliding_window_log.cc (limit a, window b). State: 'l', total cost logged, then
  -- (at, cost) pairs, oldest first.
  local len, used, pos, back = 0, 0, 10, nil
  local t = now
  if s and #s >= 25 and byte(s) == 108 and (#s - 9) % 16 == 0 then
    len = #s
    used = read('<d', s, 2)
    back = read('<d', s, len - 15)
    if back > t then t = back end
    while pos < len do  -- skip the entries out of the window
      local at, ec = read('<dd', s, pos)
      if at + b > t then break end
      used = used - ec
      pos = pos + 16
    end
    if pos > len then used = 0 end
  end
  local left = a - used
  if left < 0 then left = 0 end
  if units <= left and cost > 0 then
    local st
    if back == t then  -- the same microsecond as the newest entry: one slot
      local _, ec = read('<dd', s, len - 15)
      st = pack('<Bd', 108, used + cost) .. sub(s, pos, len - 8) .. pack('<d', ec + cost)
    elseif pos < len then
      st = pack('<Bd', 108, used + cost) .. sub(s, pos) .. pack('<dd', t, cost)
    else
      st = pack('<Bddd', 108, cost, t, cost)
    end
    return true, left - cost, t + b - now, 0, 0, st, t + b
  end
  local reset = 0
  if pos < len then reset = back + b - now end
  if units <= left then return true, left, reset, 0, 0 end
  if units > a then return false, left, reset, -1, 0 end
  while pos < len do  -- until enough has left the window
    local at, ec = read('<dd', s, pos)
    used = used - ec
    if a - used >= units then return false, left, reset, at + b - now, 0 end
    pos = pos + 16
  end
  return false, left, reset, 0, 0
end

local now = ARGV[1]
local absolute = now == ''
if absolute then
  local time = redis.call('TIME')
  now = time[1] * 1000000 + time[2]
else
  now = tonumber(now)
end

local n = #KEYS
if n == 1 then
  local limit = tonumber(ARGV[3])
  local ok, remaining, reset, retry, delay, st, e =
    decide(tonumber(ARGV[2]), redis.call('GET', KEYS[1]), limit, tonumber(ARGV[4]),
      tonumber(ARGV[5]), now, tonumber(ARGV[6]))
  if st then
    if not e then
      redis.call('SET', KEYS[1], st)
    elseif absolute then
      redis.call('SET', KEYS[1], st, 'PXAT', ceil(e / 1000))
    else
      redis.call('SET', KEYS[1], st, 'PX', ceil((e - now) / 1000) + 60000)
    end
  end
  return {ok and 1 or 0, limit, remaining, reset, retry, delay, now}
end

local states = redis.call('MGET', unpack(KEYS))
local costs, first = {}, {}
for i = 1, n do costs[i] = tonumber(ARGV[5 * i + 1]) end
local seen = {}  -- a key checked twice is decided once, for the sum of the costs
for i = 1, n do
  local j = seen[KEYS[i]]
  if j then
    first[i] = j
    costs[j] = costs[j] + costs[i]
  else
    seen[KEYS[i]] = i
  end
end

local out, writes, expiries = {}, {}, {}
local all = true
for i = 1, n do
  if not first[i] then
    local f = 5 * i
    local limit = tonumber(ARGV[f - 2])
    local ok, remaining, reset, retry, delay, st, e =
      decide(tonumber(ARGV[f - 3]), states[i], limit, tonumber(ARGV[f - 1]), tonumber(ARGV[f]),
        now, costs[i])
    local o = 6 * i - 6
    out[o + 1], out[o + 2], out[o + 3], out[o + 4], out[o + 5], out[o + 6] =
      ok and 1 or 0, limit, remaining, reset, retry, delay
    if ok then
      writes[i], expiries[i] = st, e
    else
      all = false
    end
  end
end

if all then
  for i = 1, n do
    local st = writes[i]
    if st then
      local e = expiries[i]
      if not e then
        redis.call('SET', KEYS[i], st)
      elseif absolute then
        redis.call('SET', KEYS[i], st, 'PXAT', ceil(e / 1000))
      else
        redis.call('SET', KEYS[i], st, 'PX', ceil((e - now) / 1000) + 60000)
      end
    end
  end
else
  for i = 1, n do  -- nothing is spent: the limits that would admit report a peek
    local o = 6 * i - 6
    if not first[i] and out[o + 1] == 1 then
      local f = 5 * i
      local _, remaining, reset, retry, delay =
        decide(tonumber(ARGV[f - 3]), states[i], out[o + 2], tonumber(ARGV[f - 1]),
          tonumber(ARGV[f]), now, 0)
      out[o + 3], out[o + 4], out[o + 5], out[o + 6] = remaining, reset, retry, delay
    end
  end
end

for i = 1, n do
  local j = first[i]
  if j then
    local o, p = 6 * i - 6, 6 * j - 6
    for k = 1, 6 do out[o + k] = out[p + k] end
  end
end
out[6 * n + 1] = now
return out
