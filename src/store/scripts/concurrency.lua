--[[
concurrency.lua — take or give back one slot of a concurrency limit shared by every doorman
instance. Slots are members of a sorted set scored by their expiry, so a crashed instance's
slots free themselves.

KEYS[1]  the slot set
ARGV[1]  'acquire' | 'release' | 'peek' (what acquire would answer, nothing written: doorman explain)
ARGV[2]  the session token
ARGV[3]  limit (acquire, peek)
ARGV[4]  slot lifetime in ms (acquire; refreshed by acquiring again with the same token)

Returns { ok (1|0), slots in use (after acquire; as acquire would leave them for peek) }
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] == 'peek' then
  local live = redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
  local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
  local held = score and tonumber(score) > now
  if not held and live >= tonumber(ARGV[3]) then
    return { 0, live }
  end
  if held then return { 1, live } end
  return { 1, live + 1 }
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[1] == 'release' then
  redis.call('ZREM', KEYS[1], ARGV[2])
  return { 1, redis.call('ZCARD', KEYS[1]) }
end
local limit = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])
local held = redis.call('ZSCORE', KEYS[1], ARGV[2])
local count = redis.call('ZCARD', KEYS[1])
if not held and count >= limit then
  return { 0, count }
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
return { 1, redis.call('ZCARD', KEYS[1]) }
