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
-- it exceeds anyway (rounding is monotone), or is split (the token bucket's "ceil(x * b / c)
-- split" below); every floor or ceil of a quotient of integers below 2^53 is exact. The C++
-- side clamps costs to [0, 2^52]: a cost above a limit's capacity is decided the same
-- whatever its size.
--
-- Protocol (script.h builds and reads it). Numbers travel as little-endian doubles (struct
-- 'd'): no decimal text to parse or print on either side.
-- KEYS[i]  the state of limit i; repeated keys are one limit checked twice (costs add up)
-- ARGV[1]  one string: now (d), then per limit a 33-byte record (B d d d d):
--   now    microseconds, or -1 to use Redis' TIME (production: one clock for all)
--   record algorithm code, three compiled numbers, cost:
--     0 fixed_window            limit, window, 0
--     1 sliding_window_log      limit, window, 0
--     2 sliding_window_counter  limit, window, 0
--     3 token_bucket            capacity, cycle, cycle_tokens (TokenBucket::Compile)
--     4 gcra                    burst, interval, tolerance (Gcra::Compile)
--     5 leaky_queue             burst, interval, tolerance
-- ARGV[2]  optional: several requests in one call. One string, per request the number of
--          its limits (d), in KEYS' and the records' order. Each request is decided as a call
--          of its own (all or nothing by itself), in turn, seeing what those before wrote:
--          a Sluice worker gathers the requests of one loop turn into one call, which costs
--          Redis one script run, one TIME and one reply instead of one each.
-- Returns one string: the `now` used (d), then per limit a 41-byte record (B d d d d d):
-- allowed (0/1), limit (the first compiled number), remaining, reset_after, retry_after,
-- delay (-1 for kNever).
--
-- All or nothing (MemoryStore::CheckAll): every limit of a request is decided without
-- spending; only if all admit is each one's new state written; otherwise nothing is written
-- and the limits that would have admitted report a peek (cost 0) of their state, as admitted.
--
-- State: one string per key, a tag byte and doubles (struct), written with SET only when
-- something is spent, expiring when the algorithm's ExpiresAt says the state is back to
-- fresh: PXAT in Redis' clock (rounded up to the millisecond), plus a spread of 0 to 999 ms
-- (the millisecond of `now` within its second). Every fixed window of a policy ends on the
-- same boundary, so without the spread all its keys would expire in the same millisecond,
-- and Redis removes expired keys in cycles of up to 25 ms during which it answers nothing
-- (a stall every window that every client of that Redis sees). A state read after its
-- ExpiresAt is fresh to every algorithm, so the spread changes no decision; it keeps a key
-- at most a second longer. With an explicit now (tests)
-- the key expires ExpiresAt - now plus a minute from Redis' present: the test's clock and
-- Redis' are unrelated, and the minute keeps a trace's state from expiring in real time
-- while the trace's own clock stands still or steps back. The one state kept without expiry
-- is a token bucket that never refills (a lifetime quota: ExpiresAt is never). A write that
-- leaves ExpiresAt where the state read had it (fixed_window and sliding_window_counter
-- within one window, sliding_window_log within one microsecond) keeps the key's expiry (SET
-- KEEPTTL) in Redis' clock: the key already expires then, as a key is written in one clock
-- only (production: Redis').
--
-- The keys under Sluice's prefix are Sluice's: a key that holds anything but a state this
-- script wrote (another type, a string of another shape) is decided as a fresh key and
-- replaced when a request spends on it. No content of a key makes the script fail, so one
-- request of a gathered call cannot fail the others.

-- Costs matter: the script runs once per call and Redis runs one script at a time, and
-- Redis runs this whole chunk on every call. So there are no functions (each call would
-- create their closures anew): one loop decides each limit in turn, its body the six
-- algorithms inline, and for one limit (the common case) it answers from inside the loop
-- after one GET, with no tables. Several take one MGET and one table, made with room for
-- three limits (growing a table costs more than making it). A call that spends writes one
-- SET per changed key, KEEPTTL when it can (half the cost of PXAT); a rejection or a peek
-- writes nothing. The reply is one string (Redis converts a table element by element), and
-- numbers handed to redis.call go as string.format('%d') text (Redis would print them with
-- %.17g). Constants are literals: 2^53 = 9007199254740992, 2^32 = 4294967296, 2^31 =
-- 2147483648.

local pack, read = struct.pack, struct.unpack
local floor, ceil = math.floor, math.ceil
local keys, args, sizes = KEYS, ARGV[1], ARGV[2]

local now = read('<d', args)
local absolute = now < 0
local spread = 0  -- ms added to a PXAT expiry (see State above)
if absolute then
  local time = redis.call('TIME')
  now = time[1] * 1000000 + time[2]
  spread = floor(time[2] / 1000)
end

-- Several requests in one call (ARGV[2], the groups' sizes): each group is decided as a
-- call of its own would be, in order, each seeing what those before it wrote; `out` gathers
-- their replies. Without ARGV[2], KEYS are one group, which answers at once. `o`: the keys
-- of the groups before this one.
local groups, out, o = 1, nil, 0
if sizes then groups, out = #sizes / 8, {pack('<d', now)} end
for g = 1, groups do
  local n = sizes and read('<d', sizes, 8 * g - 7) or #keys
  -- The group's first record; the others are read in the loop.
  local code, a, b, c, cost = read('<Bdddd', args, 33 * o + 9)

  -- One limit: its state. Several: all the states, and `t`: the reply's now (t[1]), per limit
  -- i its reply record (t[1 + i]) and, when it admits, its new state (t[1 + n + i], false for
  -- none) and when that expires (t[1 + 2n + i]: false for never, true to keep the key's
  -- expiry).
  local s, states, t
  if n == 1 then
    -- pcall: a key of another type answers an error (a table) rather than ending the call
    -- for every request of it; like MGET's nil for such a key, it reads as no state.
    s = redis.pcall('GET', keys[o + 1])
    if type(s) == 'table' then s = false end
  else
    states = redis.call('MGET', unpack(keys, o + 1, o + n))
    -- room for 3 limits
    t = {pack('<d', now), false, false, false, false, false, false, false, false, false}
  end

  -- A key checked twice is decided once, at its first check, for the sum of the costs. If a
  -- limit rejects, a second pass (peek) decides again, for cost 0, those that admitted.
  local all, peek, i = true, false, 1
  while i <= n do
    local key, decide = keys[o + i], true
    if n > 1 then
      for j = 1, i - 1 do
        if keys[o + j] == key then decide = false break end
      end
      if decide then
        s = states[i]
        code, a, b, c, cost = read('<Bdddd', args, 33 * (o + i) - 24)
        if peek then
          decide, cost = string.byte(t[1 + i]) == 1, 0
        else
          for j = i + 1, n do
            if keys[o + j] == key then cost = cost + read('<d', args, 33 * (o + j) + 1) end
          end
        end
      end
    end
    if decide then
      local units = cost > 1 and cost or 1  -- a peek asks about one unit
      -- The decision, and when it spends: the new state, when it expires (nil: never) and
      -- whether the state read expired then too (`same`: SET KEEPTTL will do, see above).
      local ok, remaining, reset, retry, delay = false, 0, 0, 0, 0
      local st, expires, same = nil, nil, false

      if code == 0 then
        -- fixed_window.cc (limit a, window b). State: 'f', window start, count.
        local start = now - now % b
        local count = 0
        if s and #s == 17 then
          local tag, ws, sc = read('<Bdd', s)
          if tag == 102 and ws >= start then start, count, same = ws, sc, true end
        end
        local e = start + b
        local left = a - count
        if left < 0 then left = 0 end
        if cost <= left and cost > 0 then
          ok, remaining, reset = true, left - cost, e - now
          st, expires = pack('<Bdd', 102, start, count + cost), e
        else
          remaining = left
          if count > 0 then reset = e - now end
          if units <= left then
            ok = true
          elseif units > a then
            retry = -1
          else
            retry = e - now
          end
        end

      elseif code == 2 then
        -- sliding_window_counter.cc (limit a, window b). State: 'c', window index, curr, prev.
        -- Like C++, which keeps its low 32 bits, the script decides by the low 32 bits only
        -- (an index is whole in the state only to tell when the key's expiry stays).
        local index = floor(now / b)
        local t, curr, prev = now, 0, 0
        if s and #s == 25 then
          local tag, si, sc, sp = read('<Bddd', s)
          if tag == 99 then
            local delta = (si - index) % 4294967296  -- RebuildIndex: the index nearest to now's
            if delta >= 2147483648 then delta = delta - 4294967296 end
            if delta > 0 then  -- time went backwards
              index = index + delta
              t, curr, prev = index * b, sc, sp
            elseif delta == 0 then
              curr, prev = sc, sp
            elseif delta == -1 then
              prev = sc
            end
            same = si == index
          end
        end
        local to_end = b - (t - index * b)
        local prev_part = prev * to_end
        local cap = a * b
        ok = units <= a and prev_part + (curr + units) * b <= cap
        local after = curr
        if ok then after = curr + cost end
        if prev_part + (after + 1) * b <= cap then
          remaining = a - after - ceil(prev_part / b)
          if remaining < 0 then remaining = 0 end
        end
        local ahead = t - now
        if after > 0 then
          reset = ahead + to_end + b
        elseif prev > 0 then
          reset = ahead + to_end
        end
        if ok then
          if cost > 0 then
            st, expires = pack('<Bddd', 99, index, after, prev), (index + 2) * b
          end
        elseif units > a then
          retry = -1
        else
          local slack = (a - curr - units) * b
          local x = to_end
          if slack >= 0 and prev > 0 then x = to_end - floor(slack / prev) end
          if x < to_end then
            retry = ahead + (x > 1 and x or 1)
          else
            local y = 0
            if curr > 0 then
              y = b - floor((a - units) * b / curr)
              if y < 0 then y = 0 elseif y > b then y = b end
            end
            retry = ahead + to_end + y
          end
        end

      elseif code >= 4 then
        -- gcra.cc, leaky_queue.cc (code 5: reports the delay) (burst a, interval b, tolerance
        -- c). State: 'g', TAT.
        if b == 0 then  -- limit or burst 0: nothing ever passes
          retry = -1
        else
          local start = now
          if s and #s == 9 then
            local tag, tat = read('<Bd', s)
            if tag == 103 and tat > now then start = tat end
          end
          local backlog = start - now
          retry = -1
          if units <= a then
            -- backlog + units * T <= tolerance, without a sum that may pass 2^53 after a step
            -- back
            local room = c - units * b
            if backlog > room then
              retry = backlog - room
            elseif cost > 0 then
              local after = backlog + units * b
              ok, remaining, reset, retry = true, floor((c - after) / b), after, 0
              if code == 5 then delay = backlog end
              expires = now + after
              st = pack('<Bd', 103, expires)
            else
              retry = 0
            end
          end
          if not st then
            ok, reset = retry == 0, backlog
            if backlog < c then remaining = floor((c - backlog) / b) end
          end
        end

      elseif code == 3 then
        -- token_bucket.cc (capacity a, cycle b, cycle_tokens c: the refill is c tokens every b
        -- us, 0 for none). State: 't', base, anchor.
        local base, anchor, partial, t = a, now, 0, now
        if s and #s == 17 then
          local tag, sb, sa = read('<Bdd', s)
          if tag == 116 then
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
        end
        local tokens = base + partial
        if cost == 0 then ok = tokens >= 1 else ok = cost <= tokens end
        if ok and cost > 0 then base, tokens = base - cost, tokens - cost end
        remaining = tokens > 0 and tokens or 0
        -- TimeToReach(capacity), then TimeToReach(units): from anchor until that many tokens,
        -- ceil(x * b / c) split when x * b may pass 2^53 (exact when b * c < 2^53).
        if tokens < a then  -- always so after spending
          if c == 0 then
            reset = -1
          else
            local x = a - base
            local p = x * b
            if p < 9007199254740992 then
              p = ceil(p / c)
            else
              local q = floor(x / c)
              p = q * b + ceil((x - q * c) * b / c)
            end
            reset = anchor + p - now
            if ok and cost > 0 then expires = anchor + p end
          end
        end
        if ok then
          if cost > 0 then st = pack('<Bdd', 116, base, anchor) end
        elseif units > a or c == 0 then
          retry = -1
        else
          local x = units - base
          local p = x * b
          if p < 9007199254740992 then
            p = ceil(p / c)
          else
            local q = floor(x / c)
            p = q * b + ceil((x - q * c) * b / c)
          end
          retry = anchor + p - now
        end

      else
        -- sliding_window_log.cc (limit a, window b). State: 'l', total cost logged, then
        -- (at, cost) pairs, oldest first.
        local len, used, pos, back = 0, 0, 10, nil
        local t = now
        if s and #s >= 25 and (#s - 9) % 16 == 0 and string.byte(s) == 108 then
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
          if back == t then  -- the same microsecond as the newest entry: one slot
            same = true
            local _, ec = read('<dd', s, len - 15)
            st = pack('<Bd', 108, used + cost) .. string.sub(s, pos, len - 8) ..
                     pack('<d', ec + cost)
          elseif pos < len then
            st = pack('<Bd', 108, used + cost) .. string.sub(s, pos) .. pack('<dd', t, cost)
          else
            st = pack('<Bddd', 108, cost, t, cost)
          end
          ok, remaining, reset, expires = true, left - cost, t + b - now, t + b
        else
          remaining = left
          if pos < len then reset = back + b - now end
          if units <= left then
            ok = true
          elseif units > a then
            retry = -1
          else
            while pos < len do  -- until enough has left the window (else retry stays 0)
              local at, ec = read('<dd', s, pos)
              used = used - ec
              if a - used >= units then
                retry = at + b - now
                break
              end
              pos = pos + 16
            end
          end
        end
      end

      if same and absolute then expires = true end  -- the key's expiry stays: SET KEEPTTL

      if n == 1 then
        if st then
          if expires == true then
            redis.call('SET', key, st, 'KEEPTTL')
          elseif not expires then
            redis.call('SET', key, st)
          elseif absolute then
            redis.call('SET', key, st, 'PXAT', string.format('%d', ceil(expires / 1000) + spread))
          else
            local px = ceil((expires - now) / 1000) + 60000
            redis.call('SET', key, st, 'PX', string.format('%d', px))
          end
        end
        if not out then
          return pack('<dBddddd', now, ok and 1 or 0, a, remaining, reset, retry, delay)
        end
        out[#out + 1] = pack('<Bddddd', ok and 1 or 0, a, remaining, reset, retry, delay)
        break
      end
      if peek then
        t[1 + i] = pack('<Bddddd', 1, a, remaining, reset, retry, delay)
      else
        t[1 + i] = pack('<Bddddd', ok and 1 or 0, a, remaining, reset, retry, delay)
        if ok then
          t[1 + n + i], t[1 + 2 * n + i] = st or false, expires or false
        else
          all = false
        end
      end
    end
    i = i + 1
    if i > n and not all and not peek then i, peek = 1, true end
  end

  if n > 1 then
    if all then
      for i = 1, n do
        local st = t[1 + n + i]
        if st then
          local e = t[1 + 2 * n + i]
          if e == true then
            redis.call('SET', keys[o + i], st, 'KEEPTTL')
          elseif not e then
            redis.call('SET', keys[o + i], st)
          elseif absolute then
            redis.call('SET', keys[o + i], st, 'PXAT', string.format('%d', ceil(e / 1000) + spread))
          else
            local px = ceil((e - now) / 1000) + 60000
            redis.call('SET', keys[o + i], st, 'PX', string.format('%d', px))
          end
        end
      end
    end
    for i = 2, n do  -- a repeated key reports its first check's decision
      for j = 1, i - 1 do
        if keys[o + j] == keys[o + i] then
          t[1 + i] = t[1 + j]
          break
        end
      end
    end
    if not out then return table.concat(t, '', 1, 1 + n) end
    for i = 2, 1 + n do out[#out + 1] = t[i] end
  end
  o = o + n
end
return table.concat(out)
