-- Settle: add a (usually negative) correction to windows of one principal, never below zero.
-- Same KEYS and ARGV layout as reserve.lua; cost is the correction. A fixed window whose key
-- is gone (its day or month is over) is left alone, and so is a drained bucket on a refund.

local now = tonumber(ARGV[1])

for i = 1, #KEYS do
  local a = 1 + (i - 1) * 5
  local kind, rate, delta = ARGV[a + 1], tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  if kind == "b" then
    local state = redis.call("HMGET", KEYS[i], "u", "t")
    if state[1] or delta > 0 then
      local u, t = tonumber(state[1]) or 0, tonumber(state[2]) or now
      if now > t then
        u = math.max(0, u - (now - t) * rate)
      end
      u = math.max(0, u + delta)
      redis.call("HSET", KEYS[i], "u", string.format("%.17g", u),
        "t", string.format("%.17g", math.max(now, t)))
      redis.call("PEXPIRE", KEYS[i], math.ceil(u / rate * 1000) + 60000)
    end
  elseif redis.call("EXISTS", KEYS[i]) == 1 then
    local v = redis.call("INCRBY", KEYS[i], delta)
    if v < 0 then
      redis.call("INCRBY", KEYS[i], -v) -- back to 0, keeping the key's expiry
    end
  end
end
return 1
