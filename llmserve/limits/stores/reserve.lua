-- Reserve units in every window of one principal, all or nothing (one atomic call).
-- Mirrors llmserve/limits/windows.py (refill, fits) and stores/memory.py: change them together.
--
-- KEYS[i]  one key per window: a hash {u = used, t = last update} for a bucket,
--          an integer for a fixed window (its key names the day or month).
-- ARGV[1]  now: the caller's clock, epoch seconds (the caller's, so tests can inject it).
-- then, per window, 5 values: kind ("b" bucket | "f" fixed), limit, rate (units drained per
--          second, buckets), cost (units), ttl_ms (fixed windows: until the window ends).
-- Returns {admitted (1 | 0), used_1, ..., used_n}: usage before this request, as strings
-- (Redis would truncate Lua numbers to integers).

local EPSILON = 1e-9
local now = tonumber(ARGV[1])
local used, last = {}, {}
local admitted = 1

for i = 1, #KEYS do
  local a = 1 + (i - 1) * 5
  local kind, limit, rate, cost = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]),
    tonumber(ARGV[a + 4])
  if kind == "b" then
    local state = redis.call("HMGET", KEYS[i], "u", "t")
    local u, t = tonumber(state[1]) or 0, tonumber(state[2]) or now
    if now > t then
      u = math.max(0, u - (now - t) * rate)
    end
    used[i], last[i] = u, math.max(now, t)
  else
    used[i] = tonumber(redis.call("GET", KEYS[i])) or 0
  end
  if used[i] + cost > limit + EPSILON then
    admitted = 0
  end
end

if admitted == 1 then
  for i = 1, #KEYS do
    local a = 1 + (i - 1) * 5
    local kind, rate, cost, ttl_ms = ARGV[a + 1], tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]),
      tonumber(ARGV[a + 5])
    if kind == "b" then
      local u = used[i] + cost
      redis.call("HSET", KEYS[i], "u", string.format("%.17g", u), "t", string.format("%.17g", last[i]))
      -- Once drained the bucket is empty, which is what a missing key means.
      redis.call("PEXPIRE", KEYS[i], math.ceil(u / rate * 1000) + 60000)
    else
      redis.call("INCRBY", KEYS[i], cost)
      redis.call("PEXPIRE", KEYS[i], ttl_ms)
    end
  end
end

local out = {admitted}
for i = 1, #KEYS do
  out[i + 1] = string.format("%.17g", used[i])
end
return out
