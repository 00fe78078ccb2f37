--[[
rate-limit.lua — one GCRA (generic cell rate algorithm) step: a token bucket of `limit` tokens
per `window` that refills continuously, stored as one number, the theoretical arrival time (TAT).
Atomic: the check and the charge happen in one script; the key always expires.

KEYS[1]  the bucket key (one key: every Redis Cluster slot works)
ARGV[1]  window in ms
ARGV[2]  limit: tokens per window (also the largest burst)
ARGV[3]  cost of this event in tokens (0 = only look; negative = a refund: tokens given back for
         an event refused after it was charged, never beyond a full bucket)
Time is Redis's own (TIME), so doorman instances with different clocks agree.

Returns { allowed (1|0), remaining tokens after this event, retry_after_ms, tat_ms_from_now }
  allowed = 0 leaves the bucket unchanged (a refused event costs nothing).
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local interval = window / limit
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + cost * interval
if cost < 0 then
  if new_tat <= now then
    redis.call('DEL', KEYS[1])
    return { 1, limit, 0, 0 }
  end
  redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now))
  return { 1, math.floor((window - (new_tat - now)) / interval), 0, math.ceil(new_tat - now) }
end
local allow_at = new_tat - window
if allow_at > now then
  local remaining = math.floor((window - (tat - now)) / interval)
  return { 0, remaining, math.ceil(allow_at - now), math.ceil(tat - now) }
end
if cost > 0 then
  redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
end
local remaining = math.floor((window - (new_tat - now)) / interval)
return { 1, remaining, 0, math.ceil(new_tat - now) }
