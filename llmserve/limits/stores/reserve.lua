-- Reserve units in every window of one principal, all or nothing (one atomic call), and
-- record the hold so that settle.lua, or the end of its lease, gives back what it did not use.
--
-- ARGV[1]  now: the caller's clock, epoch seconds (the caller's, so tests can inject it).
-- ARGV[2]  hold id ("": hold nothing, e.g. a request that costs no tokens)
-- ARGV[3]  lease end (epoch seconds)
-- ARGV[4]  the hold as JSON (its member in KEYS[1], see common.lua)
-- ARGV[5]  how long (ms) the hold keys must live: the longest window's life
-- then, per window, 5 values: kind ("b" bucket | "f" fixed), limit, rate (units drained per
--          second, buckets), cost (units), ttl_ms (fixed windows: until the window ends).
-- Returns {admitted (1 | 0 | -1: cancelled before it ran, charged nothing), used_1, ...,
-- used_n, held_1, ..., held_n}: usage before this request and, on a refusal, what holds in
-- flight account for of it (fixed windows), as strings (Redis would truncate Lua numbers).

local now, id = tonumber(ARGV[1]), ARGV[2]
local n = #KEYS - FIRST + 1
local used, last, held = {}, {}, {}

if id ~= "" and redis.call("ZSCORE", DONE, id) then
  return {-1} -- its request gave up on it (a timeout) and cancelled it: charge nothing
end

local function fits_all()
  local admitted = 1
  for i = 1, n do
    local key, a = KEYS[FIRST + i - 1], 5 + (i - 1) * 5
    local limit, rate, cost = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    if ARGV[a + 1] == "b" then
      used[i], last[i] = bucket(key, rate, now)
    else
      used[i] = tonumber(redis.call("GET", key)) or 0
    end
    if used[i] + cost > limit + EPSILON then
      admitted = 0
    end
  end
  return admitted
end

local admitted = fits_all()
if admitted == 0 and reconcile(now) > 0 then
  admitted = fits_all() -- the holds of a dead server gave tokens back: look again
end

if admitted == 1 then
  for i = 1, n do
    local key, a = KEYS[FIRST + i - 1], 5 + (i - 1) * 5
    local rate, cost, ttl_ms = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
    if ARGV[a + 1] == "b" then
      set_bucket(key, used[i] + cost, last[i], rate)
    elseif cost > 0 then
      if redis.call("INCRBY", key, cost) == cost then
        redis.call("PEXPIRE", key, ttl_ms) -- a new window
      end
      if id ~= "" then
        redis.call("HINCRBY", HELD, key, cost)
        redis.call("PEXPIRE", HELD, ARGV[5])
      end
    end
  end
  if id ~= "" then
    redis.call("ZADD", HOLDS, ARGV[3], ARGV[4])
    redis.call("PEXPIRE", HOLDS, ARGV[5]) -- a hold outlives its windows' keys
  end
end

local out = {admitted}
for i = 1, n do
  out[i + 1] = num(used[i])
  local h = 0
  if admitted == 0 and ARGV[5 + (i - 1) * 5 + 1] == "f" then
    h = tonumber(redis.call("HGET", HELD, KEYS[FIRST + i - 1])) or 0
  end
  out[n + i + 1] = num(h)
end
return out
