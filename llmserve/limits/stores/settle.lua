-- Settle a hold: replace what it took by what the request really cost, exactly once.
--
-- ARGV[1]  now: the caller's clock, epoch seconds
-- ARGV[2]  hold id ("": an untracked hold, always present)
-- ARGV[3]  when its settlement may be forgotten (a reserve arriving later charges nothing)
-- ARGV[4]  the hold's details (JSON, see common.lua): what it took, and when
-- then, per window (in the details' order), 2 values: actual units, ttl_ms (fixed windows:
--          until the window ends, for a charge that must create the key).
-- The hold present: each window gets actual - held (buckets refund at most what has not
-- drained). Unknown (never reserved, or expired and refunded): each window gets actual.
-- Already settled: nothing. Returns 1 when applied, 0 when already settled.

local now, id, done_until = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local hold = cjson.decode(ARGV[4])

reconcile(now)
local present = true
if id ~= "" then
  if redis.call("ZSCORE", DONE, id) then
    return 0
  end
  redis.call("ZADD", DONE, done_until, id)
  keep(DONE, math.ceil((tonumber(done_until) - now) * 1000) + MARGIN_MS)
  present = redis.call("ZREM", HOLDS, id) == 1
  redis.call("HDEL", DETAILS, id)
end

for i, w in ipairs(hold.w) do
  local a = 4 + (i - 1) * 2
  local actual, ttl_ms = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if present then
    replace(w, actual, now - hold.at, now, id ~= "", ttl_ms)
  else
    add(w.b == 1, w.k, w.r, actual, now, ttl_ms)
  end
end
return 1
