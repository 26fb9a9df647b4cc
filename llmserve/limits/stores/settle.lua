-- Settle a hold: replace what it took by what the request really cost, exactly once.
--
-- ARGV[1]  now: the caller's clock, epoch seconds
-- ARGV[2]  hold id ("": an untracked hold, always present)
-- ARGV[3]  until when its settlement is remembered (a reserve arriving later charges nothing)
-- ARGV[4]  the hold as JSON (its member in KEYS[1])
-- ARGV[5]  when it was reserved (epoch seconds)
-- then, per window, 5 values: kind ("b" | "f"), rate, units held, actual units, ttl_ms
--          (fixed windows: until the window ends, for a charge that must create the key).
-- The hold present: each window gets actual - held (buckets refund at most what has not
-- drained). Unknown (never reserved, or expired and refunded): each window gets actual.
-- Already settled: nothing. Returns 1 when applied, 0 when already settled.

local now, id = tonumber(ARGV[1]), ARGV[2]
local present = true
if id ~= "" then
  redis.call("ZREMRANGEBYSCORE", DONE, "-inf", ARGV[1])
  if redis.call("ZSCORE", DONE, id) then
    return 0
  end
  redis.call("ZADD", DONE, ARGV[3], id)
  redis.call("PEXPIRE", DONE, math.ceil((tonumber(ARGV[3]) - now) * 1000) + MARGIN_MS)
  present = redis.call("ZREM", HOLDS, ARGV[4]) == 1
end

local held_for = now - tonumber(ARGV[5])
for i = 1, #KEYS - FIRST + 1 do
  local key, a = KEYS[FIRST + i - 1], 5 + (i - 1) * 5
  local is_bucket, rate, held = ARGV[a + 1] == "b", tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local actual, ttl_ms = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  if present then
    replace(is_bucket, key, rate, held, actual, held_for, now, ttl_ms, id ~= "")
  else
    add(is_bucket, key, rate, actual, now, ttl_ms)
  end
end
return 1
