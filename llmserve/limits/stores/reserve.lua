-- Reserve units in every window of one principal, all or nothing (one atomic call), and
-- record the hold so that settle.lua or its lease's end can give back what it did not use.
--
-- ARGV[1]  now: the caller's clock, epoch seconds (the caller's, so tests can inject it).
-- ARGV[2]  hold id ("": hold nothing, e.g. a request that costs no tokens)
-- ARGV[3]  lease end (epoch seconds)
-- ARGV[4]  the hold's details (JSON, see common.lua)
-- ARGV[5]  how long (ms) the hold keys must live: the longest window's life
-- then, per window, 5 values: kind ("b" bucket | "f" fixed), limit, rate (units drained per
--          second, buckets), cost (units), ttl_ms (fixed windows: until the window ends).
-- Returns {admitted (1 | 0 | -1: settled before it ran, charged nothing), used_1, ...,
-- used_n, held_1, ..., held_n}: usage before this request and what holds in flight account
-- for of it, as strings (Redis would truncate Lua numbers to integers).

local now, id, lease_end, details = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
local keys_ttl = tonumber(ARGV[5])
local n = #KEYS - FIRST + 1
local used, last, held = {}, {}, {}
local admitted = 1

reconcile(now)
if id ~= "" and redis.call("ZSCORE", DONE, id) then
  return {-1} -- its request gave up on it (a timeout) and cancelled it: charge nothing
end

for i = 1, n do
  local key, a = KEYS[FIRST + i - 1], 5 + (i - 1) * 5
  local kind, limit, rate, cost = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]),
    tonumber(ARGV[a + 4])
  if kind == "b" then
    used[i], last[i] = bucket(key, rate, now)
    held[i] = 0
  else
    used[i] = tonumber(redis.call("GET", key)) or 0
    held[i] = tonumber(redis.call("HGET", HELD, key)) or 0
  end
  if used[i] + cost > limit + EPSILON then
    admitted = 0
  end
end

if admitted == 1 then
  for i = 1, n do
    local key, a = KEYS[FIRST + i - 1], 5 + (i - 1) * 5
    local kind, rate, cost, ttl_ms = ARGV[a + 1], tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]),
      tonumber(ARGV[a + 5])
    if kind == "b" then
      set_bucket(key, used[i] + cost, last[i], rate)
    else
      redis.call("INCRBY", key, cost)
      redis.call("PEXPIRE", key, ttl_ms)
      if id ~= "" and cost > 0 then
        count_held(key, cost)
      end
    end
  end
  if id ~= "" then
    redis.call("ZADD", HOLDS, lease_end, id)
    redis.call("HSET", DETAILS, id, details)
    for _, key in ipairs({HOLDS, DETAILS, HELD}) do
      keep(key, keys_ttl) -- a hold must outlive its windows' keys, or its refund is lost
    end
  end
end

local out = {admitted}
for i = 1, n do
  out[i + 1] = num(used[i])
  out[n + i + 1] = num(held[i])
end
return out
