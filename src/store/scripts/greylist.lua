--[[
greylist.lua — one greylisting decision for a triplet (client network, sender, recipient).

KEYS[1]  the triplet key
ARGV[1]  delay in ms: how long a new triplet is refused
ARGV[2]  retry window in ms: how long after the first attempt a retry is still recognised
ARGV[3]  pass lifetime in ms: how long a passed triplet stays passed (refreshed on each use)
ARGV[4]  '1': look only (doorman explain) — the same answer, nothing written: a new triplet is not
         recorded, a retry after the delay is not marked passed, a passed one not refreshed

State: the first-seen time while grey (expires after delay + retry window), 'P' once passed.
Returns { passed (1|0), ms left before a retry can pass (0 when passed), first attempt (1|0) }
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local delay = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local lifetime = tonumber(ARGV[3])
local look = ARGV[4] == '1'
local v = redis.call('GET', KEYS[1])
if not v then
  if not look then redis.call('SET', KEYS[1], tostring(now), 'PX', delay + window) end
  return { 0, delay, 1 }
end
if v == 'P' then
  if not look then redis.call('PEXPIRE', KEYS[1], lifetime) end
  return { 1, 0, 0 }
end
local first = tonumber(v)
if now - first < delay then
  return { 0, delay - (now - first), 0 }
end
if not look then redis.call('SET', KEYS[1], 'P', 'PX', lifetime) end
return { 1, 0, 0 }
