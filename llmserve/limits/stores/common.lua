-- Shared by reserve.lua, settle.lua and peek.lua (stores/redis.py prepends it to each).
-- Mirrors llmserve/limits/windows.py (refill, fits, settle_delta) and stores/memory.py:
-- change them together.
--
-- KEYS[1]  holds: sorted set of the holds in flight, scored by lease end (caller's clock,
--          epoch seconds). A member is the hold as JSON: {id, at = reserved at, w = [{k, b, r,
--          c, t}]}, per window its key, bucket (1) or fixed (0), rate, units held, and whether
--          it counts tokens (1 | 0).
-- KEYS[2]  held: hash, fixed-window key -> units that holds in flight account for
-- KEYS[3]  done: sorted set, hold id -> when it may be forgotten (settled or cancelled)
-- KEYS[4..] one key per window: a hash {u = used, t = last update} for a bucket, an integer
--          for a fixed window (its key names the day or month).

local EPSILON = 1e-9
local HOLDS, HELD, DONE = KEYS[1], KEYS[2], KEYS[3]
local FIRST = 4
local MARGIN_MS = 60000

local function num(x)
  return string.format("%.17g", x)
end

-- A bucket's usage at `now` after draining since its last update; its new last update;
-- whether the key exists.
local function bucket(key, rate, now)
  local state = redis.call("HMGET", key, "u", "t")
  local u, t = tonumber(state[1]) or 0, tonumber(state[2]) or now
  if now > t then
    u = math.max(0, u - (now - t) * rate)
  end
  return u, math.max(now, t), state[1] ~= false
end

local function set_bucket(key, u, t, rate)
  redis.call("HSET", key, "u", num(u), "t", num(t))
  -- Once drained the bucket is empty, which is what a missing key means.
  redis.call("PEXPIRE", key, math.ceil(u / rate * 1000) + MARGIN_MS)
end

-- Add `delta` units to a window, never below zero. A refund leaves a missing key alone (a
-- drained bucket, a window that is over); a charge to a missing fixed window creates it.
local function add(is_bucket, key, rate, delta, now, ttl_ms)
  if delta == 0 then
    return
  end
  if is_bucket then
    local u, t, exists = bucket(key, rate, now)
    if exists or delta > 0 then
      set_bucket(key, math.max(0, u + delta), t, rate)
    end
  elseif redis.call("EXISTS", key) == 1 then
    local v = redis.call("INCRBY", key, delta)
    if v < 0 then
      redis.call("INCRBY", key, -v) -- back to 0, keeping the key's expiry
    end
  elseif delta > 0 and ttl_ms > 0 then
    redis.call("SET", key, delta, "PX", ttl_ms)
  end
end

-- Replace what a hold took in one window (`held` units, `held_for` seconds ago) by `actual`.
-- `tracked`: the hold is counted in HELD (it has an id).
local function replace(is_bucket, key, rate, held, actual, held_for, now, ttl_ms, tracked)
  local delta = actual - held
  if is_bucket and delta < 0 then
    -- a bucket refunds at most what can still be in it from this hold (settle_delta)
    local still = math.max(0, held - math.max(0, held_for) * rate)
    delta = -math.floor(math.min(-delta, still))
  end
  if tracked and not is_bucket and held > 0 then
    if redis.call("HINCRBY", HELD, key, -held) <= 0 then
      redis.call("HDEL", HELD, key)
    end
  end
  add(is_bucket, key, rate, delta, now, ttl_ms)
end

-- Refund the tokens of holds whose lease ran out (their process died): the request still
-- counts in requests_per_minute. Returns how many there were.
local function reconcile(now)
  local expired = redis.call("ZRANGEBYSCORE", HOLDS, "-inf", num(now), "LIMIT", 0, 256)
  for _, member in ipairs(expired) do
    local hold = cjson.decode(member)
    for _, w in ipairs(hold.w) do
      replace(w.b == 1, w.k, w.r, w.c, w.t == 1 and 0 or w.c, now - hold.at, now, 0, true)
    end
    redis.call("ZREM", HOLDS, member)
  end
  return #expired
end
