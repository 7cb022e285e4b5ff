"""The cluster tier's server-side rules, as Lua scripts (one hash slot each: atomic).

A netswap store enforces three rules no plain Redis command can: fencing (a write
below the area's floor changes nothing), newer-only writes (a payload no newer than
the one its slot holds is not written: a late or replayed write never rolls a slot
back), and the area record (one host per area, server/claims.py). Here each is a
script run where the keys live:

- WRITE, per chunk piece of a batch: checks the bucket's floor (and raises it to
  the writer's epoch), makes the chunk's index if missing, compares each slot's
  stored generation with the new one (u64, as two u32 halves: Lua's numbers are
  doubles) and splices the newer payloads into the chunk's stream (layout.py): from
  the first newer payload to the last, the segments they touch are rewritten, and
  when the lengths change, every segment after them too (the stream stays packed:
  no hole to compact, ever). Answers how many payloads it skipped as not newer.
- DISCARD, per chunk piece: the floor check, then a whole chunk unlinked, or a
  part's payloads cut out of the stream and its index entries zeroed.
- FETCH, per chunk piece of a read: the payloads (found by the lengths before them)
  with their generations, tags, lengths and seals, in one round trip.
- FENCE: raise a floor to an epoch, or refuse ESTALE below it.
- CLAIM and CLEARED: the area record's rules (make, grow, replace, release; EEXIST
  naming the holder). A replaced or released life's chunks are unlinked by the client
  between the two (they live in other hash slots); until CLEARED the record says how
  many slots are `clearing`, and the area does not count as held.

Every key a script touches is one of its KEYS (the chunk's index and stream, the
bucket's floor): while Redis migrates a hash slot, a script whose keys are not all
on one node is refused TRYAGAIN or ASK before it runs -- never stopped half way.
Errors come back as `ERRNAME text` replies (client/cluster/router.py maps the name to
an errno). Scripts are sent by SHA (EVALSHA) and by body once a node answers NOSCRIPT
(a promoted replica or a restarted node has an empty script cache).
"""

from __future__ import annotations

import hashlib
from typing import Any

from netswap.protocol import MAX_PAYLOAD, MIN_PAYLOAD, SEAL_SIZE

from .layout import (
    CHUNK_PAGES,
    GEN_SIZE,
    INDEX_BYTES,
    LEN_SIZE,
    LENS_AT,
    SEALS_AT,
    SEGMENT,
    TAG_SIZE,
    TAGS_AT,
)

_FLOOR = """
local floor = tonumber(redis.call('GET', KEYS[3]) or '0')
local epoch = tonumber(ARGV[1])
if epoch < floor then
  return redis.error_reply('ESTALE area held by a newer agent (epoch ' .. floor ..
                           '); this client is at epoch ' .. epoch)
end
if epoch > floor then redis.call('SET', KEYS[3], ARGV[1]) end
"""

# The stream of a chunk (KEYS[1]: its index, KEYS[2]: its hash of segments): where each
# slot's payload starts, the bytes of a span, and a span replaced.
_STREAM = f"""
local C, SEG = {CHUNK_PAGES}, {SEGMENT}
local cache = {{}}
local function segment(k)
  local s = cache[k]
  if s == nil then
    s = redis.call('HGET', KEYS[2], k) or ''
    cache[k] = s
  end
  return s
end
-- the stream's bytes a .. b-1 (from 0), appended to parts
local function bytes(parts, a, b)
  while a < b do
    local k = math.floor(a / SEG)
    local e = math.min(b, (k + 1) * SEG)
    parts[#parts + 1] = string.sub(segment(k), a - k * SEG + 1, e - k * SEG)
    a = e
  end
end
-- at[i]: where slot i's payload starts (i = 0 .. C; at[C]: the stream's length)
local function starts(index)
  local b = {{string.byte(index, {LENS_AT} + 1, {LENS_AT} + 2 * C)}}
  local at, sum = {{}}, 0
  for i = 0, C - 1 do
    at[i] = sum
    sum = sum + b[2 * i + 1] + b[2 * i + 2] * 256
  end
  at[C] = sum
  return at
end
-- the stream's bytes a .. b-1 replaced by the parts r (rlen bytes in all): the
-- segments from a's on are rewritten -- up to b's when the length stays, else to
-- the end -- and those past the new end deleted
local function splice(a, b, r, rlen, total)
  local first = math.floor(a / SEG)
  local stop = total
  if rlen == b - a then stop = math.min(total, (math.floor((b - 1) / SEG) + 1) * SEG) end
  local parts = {{}}
  bytes(parts, first * SEG, a)
  for _, part in ipairs(r) do parts[#parts + 1] = part end
  bytes(parts, b, stop)
  local buf = table.concat(parts)
  local k = first
  for at = 1, #buf, SEG do
    redis.call('HSET', KEYS[2], k, string.sub(buf, at, at + SEG - 1))
    k = k + 1
  end
  for j = math.ceil((total - (b - a) + rlen) / SEG), math.ceil(total / SEG) - 1 do
    redis.call('HDEL', KEYS[2], j)
  end
end
"""

# KEYS: index, stream, bucket floor. ARGV: epoch, first slot's offset in the chunk,
# payloads, their bytes back to back, their lengths (u16 LE), generations (u64 LE),
# tags (u32 LE), seals ('' when unsealed).
WRITE_LUA = (
    _FLOOR
    + _STREAM
    + f"""
local off, n = tonumber(ARGV[2]), tonumber(ARGV[3])
local pay, lens, gens, tags, seals = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local len, from, sum = {{}}, {{}}, 0
local b = {{string.byte(lens, 1, 2 * n)}}
for i = 0, n - 1 do
  len[i] = (b[2 * i + 1] or 0) + (b[2 * i + 2] or 0) * 256
  if len[i] < {MIN_PAYLOAD} or len[i] > {MAX_PAYLOAD} then
    return redis.error_reply('EINVAL a payload of ' .. len[i] .. ' bytes')
  end
  from[i] = sum
  sum = sum + len[i]
end
if sum ~= #pay or #gens ~= n * 8 or #tags ~= n * 4 then
  return redis.error_reply('EINVAL payloads, lengths, generations and tags disagree')
end
local index = redis.call('GET', KEYS[1])
if not index then
  index = string.rep('\\0', {INDEX_BYTES})
  redis.call('SET', KEYS[1], index)
end
local at = starts(index)
local newer, first, last, skipped = {{}}, -1, -1, 0
for i = 0, n - 1 do
  local nlo, nhi = struct.unpack('<I4I4', gens, i * 8 + 1)
  local hlo, hhi = struct.unpack('<I4I4', index, (off + i) * 8 + 1)
  if nhi > hhi or (nhi == hhi and nlo > hlo) then
    newer[i] = true
    if first < 0 then first = i end
    last = i
  else
    skipped = skipped + 1
  end
end
if first < 0 then return skipped end
-- the payloads from the first newer one to the last: a run of newer ones from ARGV,
-- a run of skipped ones from the stream as it is
local r, rlen, i = {{}}, 0, first
while i <= last do
  local j = i
  while j <= last and (newer[j] == true) == (newer[i] == true) do j = j + 1 end
  if newer[i] then
    r[#r + 1] = string.sub(pay, from[i] + 1, from[j - 1] + len[j - 1])
    rlen = rlen + from[j - 1] + len[j - 1] - from[i]
  else
    bytes(r, at[off + i], at[off + j])
    rlen = rlen + at[off + j] - at[off + i]
  end
  if newer[i] then
    local function part(s, size) return string.sub(s, i * size + 1, j * size) end
    redis.call('SETRANGE', KEYS[1], (off + i) * {GEN_SIZE}, part(gens, {GEN_SIZE}))
    redis.call('SETRANGE', KEYS[1], {TAGS_AT} + (off + i) * {TAG_SIZE}, part(tags, {TAG_SIZE}))
    redis.call('SETRANGE', KEYS[1], {LENS_AT} + (off + i) * {LEN_SIZE}, part(lens, {LEN_SIZE}))
    if #seals > 0 then
      redis.call('SETRANGE', KEYS[1], {SEALS_AT} + (off + i) * {SEAL_SIZE},
                 part(seals, {SEAL_SIZE}))
    end
  end
  i = j
end
splice(at[off + first], at[off + last + 1], r, rlen, at[C])
return skipped
"""
)

# KEYS: index, stream, bucket floor. ARGV: epoch, offset, slots.
DISCARD_LUA = (
    _FLOOR
    + _STREAM
    + f"""
local off, n = tonumber(ARGV[2]), tonumber(ARGV[3])
if n == C then
  redis.call('UNLINK', KEYS[1], KEYS[2])
  return 1
end
local index = redis.call('GET', KEYS[1])
if not index then return 1 end
local at = starts(index)
if at[off + n] > at[off] then splice(at[off], at[off + n], {{}}, 0, at[C]) end
redis.call('SETRANGE', KEYS[1], off * {GEN_SIZE}, string.rep('\\0', n * {GEN_SIZE}))
redis.call('SETRANGE', KEYS[1], {TAGS_AT} + off * {TAG_SIZE}, string.rep('\\0', n * {TAG_SIZE}))
redis.call('SETRANGE', KEYS[1], {SEALS_AT} + off * {SEAL_SIZE},
           string.rep('\\0', n * {SEAL_SIZE}))
redis.call('SETRANGE', KEYS[1], {LENS_AT} + off * {LEN_SIZE}, string.rep('\\0', n * {LEN_SIZE}))
return 1
"""
)

# KEYS: index, stream. ARGV: offset, slots, sealed (1/0). Answers nil for a chunk never
# made, else {payloads back to back, generations, tags, lengths[, seals]}.
FETCH_LUA = (
    _STREAM
    + f"""
local off, n = tonumber(ARGV[1]), tonumber(ARGV[2])
local index = redis.call('GET', KEYS[1])
if not index then return false end
local at = starts(index)
local parts = {{}}
bytes(parts, at[off], at[off + n])
local out = {{table.concat(parts),
  string.sub(index, off * {GEN_SIZE} + 1, (off + n) * {GEN_SIZE}),
  string.sub(index, {TAGS_AT} + off * {TAG_SIZE} + 1, {TAGS_AT} + (off + n) * {TAG_SIZE}),
  string.sub(index, {LENS_AT} + off * {LEN_SIZE} + 1, {LENS_AT} + (off + n) * {LEN_SIZE})}}
if ARGV[3] == '1' then
  out[5] = string.sub(index, {SEALS_AT} + off * {SEAL_SIZE} + 1,
                      {SEALS_AT} + (off + n) * {SEAL_SIZE})
end
return out
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


WRITE, DISCARD, FETCH = Script(WRITE_LUA), Script(DISCARD_LUA), Script(FETCH_LUA)
FENCE, READ, CLAIM = Script(FENCE_LUA), Script(READ_LUA), Script(CLAIM_LUA)
CLEARED = Script(CLEARED_LUA)
BY_SHA = {s.sha: s for s in (WRITE, DISCARD, FETCH, FENCE, READ, CLAIM, CLEARED)}
