-- Usage of each window at ARGV[1] (now), charging nothing; holds whose lease ran out are
-- refunded first, so what this reads is what a reserve would see.
-- ARGV[1 + i]: "b" (bucket) or "f" (fixed) for window i; ARGV[1 + n + i]: its rate.

local now = tonumber(ARGV[1])
local n = #KEYS - FIRST + 1
reconcile(now)
local out = {}
for i = 1, n do
  local key = KEYS[FIRST + i - 1]
  if ARGV[1 + i] == "b" then
    out[i] = num((bucket(key, tonumber(ARGV[1 + n + i]), now)))
  else
    out[i] = num(tonumber(redis.call("GET", key)) or 0)
  end
end
return out
