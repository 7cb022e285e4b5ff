"""The cluster tier's server-side rules, as Lua scripts (one hash slot each: atomic).

A netswap store enforces three rules no plain Redis command can: fencing (a write
below the area's floor changes nothing), newer-only writes (a page no newer than
the one its slot holds is not written: a late or replayed write never rolls a slot
back), and the area record (one host per area, server/claims.py). Here each is a
script run where the keys live:

- WRITE, per chunk piece of a batch: checks the bucket's floor (and raises it to
  the writer's epoch), makes the chunk's two values at their final size if missing,
  compares each slot's stored generation with the new one (u64, as two u32 halves:
  Lua's numbers are doubles) and writes the runs of newer pages with SETRANGE.
  Answers how many pages it skipped as not newer.
- DISCARD, per chunk piece: the floor check, then a whole chunk unlinked or a part's
  generations zeroed (held no longer).
- FENCE: raise a floor to an epoch, or refuse ESTALE below it.
- CLAIM and CLEARED: the area record's rules (make, grow, replace, release; EEXIST
  naming the holder). A replaced or released life's chunks are unlinked by the client
  between the two (they live in other hash slots); until CLEARED the record says how
  many slots are `clearing`, and the area does not count as held.

Errors come back as `ERRNAME text` replies (client/cluster/router.py maps the name to
an errno). Scripts are sent by SHA (EVALSHA) and by body once a node answers NOSCRIPT
(a promoted replica or a restarted node has an empty script cache).
"""

from __future__ import annotations

import hashlib
from typing import Any

from netswap.protocol import PAGE_SIZE, SEAL_SIZE

from .layout import CHUNK_PAGES, GEN_SIZE, META_BYTES, PAGES_BYTES, SEALS_AT, TAG_SIZE, TAGS_AT

_FLOOR = """
local floor = tonumber(redis.call('GET', KEYS[3]) or '0')
local epoch = tonumber(ARGV[1])
if epoch < floor then
  return redis.error_reply('ESTALE area held by a newer agent (epoch ' .. floor ..
                           '); this client is at epoch ' .. epoch)
end
if epoch > floor then redis.call('SET', KEYS[3], ARGV[1]) end
"""

# KEYS: pages, metadata, bucket floor. ARGV: epoch, first slot's offset in the chunk,
# pages, page bytes, generations (u64 LE), tags (u32 LE), seals ('' when unsealed).
WRITE_LUA = (
    _FLOOR
    + f"""
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SET', KEYS[1], string.rep('\\0', {PAGES_BYTES}))
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('SET', KEYS[2], string.rep('\\0', {META_BYTES}))
end
local off, n = tonumber(ARGV[2]), tonumber(ARGV[3])
local pages, gens, tags, seals = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local held = redis.call('GETRANGE', KEYS[2], off * {GEN_SIZE}, (off + n) * {GEN_SIZE} - 1)
local function put(a, b)
  local function part(s, size)
    if a == 0 and b == n then return s end
    return string.sub(s, a * size + 1, b * size)
  end
  redis.call('SETRANGE', KEYS[1], (off + a) * {PAGE_SIZE}, part(pages, {PAGE_SIZE}))
  redis.call('SETRANGE', KEYS[2], (off + a) * {GEN_SIZE}, part(gens, {GEN_SIZE}))
  redis.call('SETRANGE', KEYS[2], {TAGS_AT} + (off + a) * {TAG_SIZE}, part(tags, {TAG_SIZE}))
  if #seals > 0 then
    redis.call('SETRANGE', KEYS[2], {SEALS_AT} + (off + a) * {SEAL_SIZE},
               part(seals, {SEAL_SIZE}))
  end
end
local skipped, run = 0, -1
for i = 0, n - 1 do
  local nlo, nhi = struct.unpack('<I4I4', gens, i * 8 + 1)
  local hlo, hhi = struct.unpack('<I4I4', held, i * 8 + 1)
  if nhi > hhi or (nhi == hhi and nlo > hlo) then
    if run < 0 then run = i end
  else
    skipped = skipped + 1
    if run >= 0 then put(run, i) run = -1 end
  end
end
if run >= 0 then put(run, n) end
return skipped
"""
)

# KEYS: pages, metadata, bucket floor. ARGV: epoch, offset, slots.
DISCARD_LUA = (
    _FLOOR
    + f"""
local off, n = tonumber(ARGV[2]), tonumber(ARGV[3])
if n == {CHUNK_PAGES} then
  redis.call('UNLINK', KEYS[1], KEYS[2])
elseif redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('SETRANGE', KEYS[2], off * {GEN_SIZE}, string.rep('\\0', n * {GEN_SIZE}))
end
return 1
"""
)

# KEYS: a floor. ARGV: epoch. Answers the floor before.
FENCE_LUA = """
local floor = tonumber(redis.call('GET', KEYS[1]) or '0')
local epoch = tonumber(ARGV[1])
if epoch < floor then
  return redis.error_reply('ESTALE area held by a newer agent (epoch ' .. floor .. ')')
end
if epoch > floor then redis.call('SET', KEYS[1], ARGV[1]) end
return floor
"""

# The area record as it is: {slots, area id, holder, clearing} ('' holder: none). A record
# from before protocol 4 is a string holding the slot count: life 0, no holder.
_RECORD = """
local slots, id, holder, clearing, exists = 0, '0', '', 0, true
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'hash' then
  local v = redis.call('HMGET', KEYS[1], 'slots', 'area_id', 'holder', 'clearing')
  slots, id, holder = tonumber(v[1] or '0'), v[2] or '0', v[3] or ''
  clearing = tonumber(v[4] or '0')
elseif kind == 'string' then
  slots = tonumber(redis.call('GET', KEYS[1])) or 0
else
  exists = false
end
"""

# KEYS: area record, area floor. Answers {slots, area id, holder, clearing, floor}.
READ_LUA = (
    _RECORD
    + """
return {slots, id, holder, clearing, tonumber(redis.call('GET', KEYS[2]) or '0')}
"""
)

# KEYS: area record, area floor. ARGV: activate (1/0), slots, area id (decimal), holder,
# force (1/0), epoch. Answers the slots whose chunks must be unlinked now (0: none).
CLAIM_LUA = (
    _RECORD
    + """
local floor = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[6]) < floor then
  return redis.error_reply('ESTALE area held by a newer agent (epoch ' .. floor .. ')')
end
local want_id, want_holder, force = ARGV[3], ARGV[4], ARGV[5] == '1'
local another = holder ~= '' and want_holder ~= holder
local function held()
  return redis.error_reply('EEXIST area is held by ' .. holder .. ' (area id ' .. id ..
                           '); only a forced takeover replaces it')
end
local function record(s, i, h, c)
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'slots', s, 'area_id', i, 'holder', h, 'clearing', c)
end
if ARGV[1] == '1' then
  if exists and (want_id == '0' or want_id == id) and not (want_holder ~= '' and another) then
    if tonumber(ARGV[2]) < slots then
      return redis.error_reply('EINVAL the area has ' .. slots .. ' slots; cannot shrink')
    end
    record(ARGV[2], id, holder, clearing)
    return clearing
  end
  if exists and not (force or holder == '' or holder == want_holder) then return held() end
  if exists then clearing = math.max(clearing, slots) end
  record(ARGV[2], want_id, want_holder, clearing)
  return clearing
end
if exists and another and not force then return held() end
clearing = math.max(clearing, slots)
record(0, '0', '', clearing)
return clearing
"""
)

# KEYS: area record, area floor. ARGV: epoch, the clearing count that was cleared.
CLEARED_LUA = (
    _RECORD
    + """
local floor = tonumber(redis.call('GET', KEYS[2]) or '0')
if tonumber(ARGV[1]) < floor then
  return redis.error_reply('ESTALE area held by a newer agent (epoch ' .. floor .. ')')
end
if kind == 'hash' and clearing == tonumber(ARGV[2]) then
  if slots == 0 and holder == '' then
    redis.call('DEL', KEYS[1])
  else
    redis.call('HDEL', KEYS[1], 'clearing')
  end
end
return 1
"""
)


class Script:
    """A script sent by SHA; its body once a node says NOSCRIPT."""

    __slots__ = ("body", "sha")

    def __init__(self, body: str) -> None:
        self.body = body
        self.sha = hashlib.sha1(body.encode()).hexdigest()

    def args(self, keys: list[str], *argv: Any) -> tuple[Any, ...]:
        return ("EVALSHA", self.sha, len(keys), *keys, *argv)

    def with_body(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return ("EVAL", self.body, *args[2:])


WRITE, DISCARD, FENCE = Script(WRITE_LUA), Script(DISCARD_LUA), Script(FENCE_LUA)
READ, CLAIM, CLEARED = Script(READ_LUA), Script(CLAIM_LUA), Script(CLEARED_LUA)
BY_SHA = {s.sha: s for s in (WRITE, DISCARD, FENCE, READ, CLAIM, CLEARED)}
