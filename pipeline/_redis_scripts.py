"""The Lua scripts of :class:`~pipeline._redis_gates.RedisSlidingWindowGate`, one per operation.

Every script starts with the same prelude: it names the gate's six keys, reads Redis ``TIME``
(so every host shares one clock) and refreshes the keys' TTL, so all keys of a gate expire
together when it is idle. Each script is atomic on the server; the gate calls them with
``KEYS`` in :data:`KEY_PARTS` order and ``ARGV[1]`` the wake channel, ``ARGV[2]`` the TTL (ms).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["KEY_PARTS", "SCRIPTS", "register_scripts"]

# -- Lua --------------------------------------------------------------------------------------
# KEYS: sent, pending, amounts, state, queue, queue leases. ARGV[1] the wake channel, ARGV[2] the
# keys' TTL (ms). Times are Redis TIME in ms. ``state`` holds used (units in sent + pending),
# ticket (the last ticket handed out), deficit / deficit_until (what the provider reported).
_PRELUDE = """
local sent, pend, amt, state, queue, qlease = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local function touch()
  for i = 1, 6 do redis.call('PEXPIRE', KEYS[i], ARGV[2]) end
end
local function wake()
  local head = redis.call('ZRANGE', queue, 0, 0)[1]
  if head then redis.call('PUBLISH', ARGV[1], head) end
end
local function chunks(ids, fn)
  for i = 1, #ids, 500 do fn({unpack(ids, i, math.min(i + 499, #ids))}) end
end
local function free(zkey, ids)
  local total = 0
  chunks(ids, function(c)
    for _, a in ipairs(redis.call('HMGET', amt, unpack(c))) do
      total = total + (tonumber(a) or 0)
    end
    redis.call('ZREM', zkey, unpack(c))
    redis.call('HDEL', amt, unpack(c))
  end)
  if total ~= 0 then redis.call('HINCRBY', state, 'used', -total) end
end
local function purge()
  free(sent, redis.call('ZRANGEBYSCORE', sent, '-inf', now))
  free(pend, redis.call('ZRANGEBYSCORE', pend, '-inf', now))
  local dead = redis.call('ZRANGEBYSCORE', qlease, '-inf', now)
  chunks(dead, function(c)
    redis.call('ZREM', queue, unpack(c))
    redis.call('ZREM', qlease, unpack(c))
  end)
  if #dead > 0 then wake() end
  local till = tonumber(redis.call('HGET', state, 'deficit_until'))
  if till and now >= till then redis.call('HDEL', state, 'deficit', 'deficit_until') end
  if redis.call('ZCARD', sent) + redis.call('ZCARD', pend) == 0 then
    redis.call('HDEL', state, 'used')  -- self-healing: nothing held means nothing used
  end
  return tonumber(redis.call('HGET', state, 'used')) or 0
end
"""

# ARGV: 3 rid, 4 amount, 5 ticket (0: none yet), 6 capacity, 7 pending lease, 8 queue lease.
# Returns {granted, wait_ms (-1: unknown, wait for a message), used, rank, ticket}.
_ACQUIRE = (
    _PRELUDE
    + """
local used = purge()
local rid, amount, ticket, cap = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local deficit = tonumber(redis.call('HGET', state, 'deficit')) or 0
local function fits() return used + amount <= cap - deficit end
local function grant()
  redis.call('ZADD', pend, now + tonumber(ARGV[7]), rid)
  redis.call('HSET', amt, rid, amount)
  used = redis.call('HINCRBY', state, 'used', amount)
  touch()
end
-- When to check again: enough sent units have ended, or the provider's deficit lapses.
local function wait_ms()
  local when = -1
  if deficit > 0 then when = tonumber(redis.call('HGET', state, 'deficit_until')) end
  local excess = used + amount - (cap - deficit)
  local freed, start = 0, 0
  while excess > 0 do
    local batch = redis.call('ZRANGE', sent, start, start + 99, 'WITHSCORES')
    if #batch == 0 then break end  -- pending units hold the rest: a send or release helps
    local ids = {}
    for i = 1, #batch, 2 do ids[#ids + 1] = batch[i] end
    local amounts = redis.call('HMGET', amt, unpack(ids))
    for i = 1, #ids do
      freed = freed + (tonumber(amounts[i]) or 0)
      if freed >= excess then
        local at = tonumber(batch[2 * i])
        if when < 0 or at < when then when = at end
        excess = 0
        break
      end
    end
    start = start + 100
  end
  if when < 0 then return -1 end
  return math.ceil(math.max(when - now, 0))
end
if ticket == 0 then
  if redis.call('ZCARD', queue) == 0 and fits() then grant(); return {1, 0, used, 0, 0} end
  ticket = redis.call('HINCRBY', state, 'ticket', 1)
end
redis.call('ZADD', queue, ticket, ticket)  -- idempotent; puts back a ticket whose lease lapsed
redis.call('ZADD', qlease, now + tonumber(ARGV[8]), ticket)
touch()
local rank = redis.call('ZRANK', queue, ticket)
if rank > 0 then return {0, -1, used, rank, ticket} end
if fits() then
  grant()
  redis.call('ZREM', queue, ticket)
  redis.call('ZREM', qlease, ticket)
  wake()
  return {1, 0, used, 0, ticket}
end
return {0, wait_ms(), used, 0, ticket}
"""
)

# ARGV: 3 rid, 4 amount, 5 lag ms (event to now), 6 guard ms, 7 window ms. Sets the window end
# to event + guard + window (+1 ms: a tie at the boundary must not go our way); never later.
_SETTLE = (
    _PRELUDE
    + """
purge()
local rid, amount = ARGV[3], tonumber(ARGV[4])
local expires = now - tonumber(ARGV[5]) + tonumber(ARGV[6]) + tonumber(ARGV[7]) + 1
if redis.call('ZSCORE', pend, rid) then
  redis.call('ZREM', pend, rid)
  redis.call('ZADD', sent, expires, rid)
elseif redis.call('ZSCORE', sent, rid) then
  redis.call('ZADD', sent, 'LT', expires, rid)
elseif expires > now then
  -- Its lease lapsed, or the local fallback granted it: the request still counts.
  redis.call('ZADD', sent, expires, rid)
  redis.call('HSET', amt, rid, amount)
  redis.call('HINCRBY', state, 'used', amount)
end
touch()
wake()
return tonumber(redis.call('HGET', state, 'used')) or 0
"""
)

# ARGV: 3 rid.
_RELEASE = (
    _PRELUDE
    + """
purge()
local rid = ARGV[3]
local amount = tonumber(redis.call('HGET', amt, rid))
if amount then
  redis.call('ZREM', pend, rid)
  redis.call('ZREM', sent, rid)
  redis.call('HDEL', amt, rid)
  redis.call('HINCRBY', state, 'used', -amount)
  wake()
end
return tonumber(redis.call('HGET', state, 'used')) or 0
"""
)

# ARGV: 3 rid, 4 actual.
_RECONCILE = (
    _PRELUDE
    + """
purge()
local rid, actual = ARGV[3], tonumber(ARGV[4])
local amount = tonumber(redis.call('HGET', amt, rid))
if amount and amount ~= actual then
  redis.call('HSET', amt, rid, actual)
  redis.call('HINCRBY', state, 'used', actual - amount)
  if actual < amount then wake() end
end
return tonumber(redis.call('HGET', state, 'used')) or 0
"""
)

# ARGV: 3 ticket.
_LEAVE = (
    _PRELUDE
    + """
local head = redis.call('ZRANGE', queue, 0, 0)[1]
redis.call('ZREM', queue, ARGV[3])
redis.call('ZREM', qlease, ARGV[3])
if head == ARGV[3] then wake() end
return purge()
"""
)

# ARGV: 3 remaining, 4 reset ms, 5 guard ms, 6 capacity, 7 units the provider counts in its
# window (-1: unknown), 8 ms since the report, 9 ms since as_of (-1: none), 10 window ms.
# Less room than ours: a deficit until the reset. More room: the oldest sent entries that
# arrived before as_of (window end <= as_of + window) and that the provider no longer counts
# are freed, a prefix in end order, so what stays covers its count.
_OBSERVE = (
    _PRELUDE
    + """
local at = now - tonumber(ARGV[8])
local recent = 0
chunks(redis.call('ZRANGEBYSCORE', sent, '(' .. at, now), function(c)
  for _, a in ipairs(redis.call('HMGET', amt, unpack(c))) do
    recent = recent + (tonumber(a) or 0)
  end
end)
local used = purge()
-- Compared with what we held when the report was made: entries that ended since would make a
-- report that was merely late look like a provider with less room than us.
local deficit = tonumber(ARGV[6]) - math.max(tonumber(ARGV[3]), 0) - used - recent
if deficit > 0 then
  redis.call('HSET', state, 'deficit', deficit,
             'deficit_until', at + tonumber(ARGV[4]) + tonumber(ARGV[5]))
  touch()
  return used
end
redis.call('HDEL', state, 'deficit', 'deficit_until')  -- a newer report explains all usage
local counted, since = tonumber(ARGV[7]), tonumber(ARGV[9])
if counted < 0 or since < 0 or redis.call('ZCARD', queue) == 0 then return used end
local ids = redis.call('ZRANGEBYSCORE', sent, '-inf', now - since + tonumber(ARGV[10]) + 1)
local amounts, total = {}, 0
chunks(ids, function(c)
  for _, a in ipairs(redis.call('HMGET', amt, unpack(c))) do
    amounts[#amounts + 1] = tonumber(a) or 0
    total = total + (tonumber(a) or 0)
  end
end)
local excess = total - counted
local gone = {}
for i = 1, #ids do
  if amounts[i] > excess then break end
  excess = excess - amounts[i]
  gone[#gone + 1] = ids[i]
end
if #gone == 0 then return used end
free(sent, gone)
wake()
touch()
return tonumber(redis.call('HGET', state, 'used')) or 0
"""
)

# ARGV: 3 pending lease, 4 queue lease, 5 number of leased entries, then (rid, amount) pairs,
# then tickets. A leased entry that lapsed (the process stalled) is put back: it still counts.
_RENEW = (
    _PRELUDE
    + """
local n = tonumber(ARGV[5])
local lease = now + tonumber(ARGV[3])
for i = 6, 4 + 2 * n, 2 do
  local rid, amount = ARGV[i], tonumber(ARGV[i + 1])
  if not redis.call('ZSCORE', pend, rid) then
    redis.call('HSET', amt, rid, amount)
    redis.call('HINCRBY', state, 'used', amount)
  end
  redis.call('ZADD', pend, lease, rid)
end
for i = 6 + 2 * n, #ARGV do redis.call('ZADD', qlease, 'XX', now + tonumber(ARGV[4]), ARGV[i]) end
touch()
return purge()
"""
)

# ARGV: 3 only if empty (1/0), 4 pending lease, then (rid, expires in ms, amount, pending 1/0)*.
# An existing entry keeps the larger amount and the later expiry (the shared placeholder).
_IMPORT = (
    _PRELUDE
    + """
purge()
if ARGV[3] == '1' and redis.call('ZCARD', sent) + redis.call('ZCARD', pend) > 0 then return 0 end
local loaded = 0
for i = 5, #ARGV, 4 do
  local rid, ttl, amount = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local zkey, score = sent, now + ttl
  if ARGV[i + 3] == '1' then zkey, score = pend, now + tonumber(ARGV[4]) end
  if ttl > 0 and amount > 0 then
    local old = tonumber(redis.call('HGET', amt, rid)) or 0
    if amount > old then
      redis.call('HSET', amt, rid, amount)
      redis.call('HINCRBY', state, 'used', amount - old)
    end
    redis.call('ZADD', zkey, 'GT', score, rid)
    loaded = loaded + 1
  end
end
touch()
wake()
return loaded
"""
)

SCRIPTS = {
    "acquire": _ACQUIRE,
    "settle": _SETTLE,
    "release": _RELEASE,
    "reconcile": _RECONCILE,
    "leave": _LEAVE,
    "observe": _OBSERVE,
    "renew": _RENEW,
    "import": _IMPORT,
}
KEY_PARTS = ("sent", "pending", "amounts", "state", "queue", "qlease")


def register_scripts(client: Redis) -> dict[str, AsyncScript]:
    """The scripts registered on ``client``, by operation name (``SCRIPTS``' keys)."""
    return {name: client.register_script(script) for name, script in SCRIPTS.items()}
