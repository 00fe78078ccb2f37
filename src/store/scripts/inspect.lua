--[[
inspect.lua — read one key of the limit state for `doorman limits show`, with Redis's own clock
so the times agree with the other scripts (which use TIME too). Read only.

KEYS[1]  the key (a rate-limit bucket, a concurrency slot set or a greylist triplet)

Returns { now_ms }                                  no such key
        { now_ms, 'string', pttl_ms, value }        a bucket (its TAT) or a triplet (first seen, or 'P')
        { now_ms, 'zset', pttl_ms, { token… } }     slots not yet expired
        { now_ms, type, pttl_ms }                   anything else
]]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ty = redis.call('TYPE', KEYS[1]).ok
if ty == 'none' then return { now } end
local ttl = redis.call('PTTL', KEYS[1])
if ty == 'string' then return { now, ty, ttl, redis.call('GET', KEYS[1]) } end
if ty == 'zset' then return { now, ty, ttl, redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf') } end
return { now, ty, ttl }
