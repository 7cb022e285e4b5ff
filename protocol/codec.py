"""Frame codec: a 4-byte big-endian length, then a body, in one of two layouts.

The handshake (a Hello and the store's answer to it) keeps protocol 2's layout,
a msgpack array [TYPE, request_id, field, ...], so that peers of different
versions still understand each other's first words: an older agent gets one
clear EPROTONOSUPPORT line from a newer store, and the other way round (a Hello
of a later version with more fields is read for its version). A Welcome has no
defaults on the wire: one of another version or shape is an error that says so,
never a Welcome read with fields missing.

After the handshake every body starts with an 8-byte head -- type (u8), flags
(u8), count (u16), request id (u32), little-endian -- and then:

  SwapOut  the number of runs (u64); the runs (u64 each: first slot << 16 | count,
           runs.py); generations (u64 x count); tags (u32 x count); lengths
           (u16 x count) if flags has SIZED; seals (16 B x count) if flags has
           SEALED; the payloads back to back.
  SwapIn   the number of runs, the runs. SEALED asks for the seals.
  Pages    generations, tags, lengths if SIZED, seals if SEALED, the payloads.
  Held     slots (u64 x count), generations (u64 x count), lengths (u16 x count).

A payload is 1..PAGE_SIZE bytes (limits.py). Without SIZED every payload is a
whole page, and the frame is protocol 3's: a batch of whole pages carries no
lengths and costs what it did.
  Ok       nothing.
  others   a msgpack array of the message's fields after its request id.

So a batch is a few packed arrays and one run of pages: the sender writes them
straight from its buffers and the receiver reads them as views of what it
received, with no msgpack object per page. Decoding never trusts the peer:
every length is computed from the head and must match the body exactly, msgpack
is asked to bound every container, and every failure is RemoteProtocolError.
"""

from __future__ import annotations

import dataclasses
import struct
from array import array
from collections.abc import Sequence
from typing import Any

import msgpack

from .errors import LocalProtocolError, RemoteProtocolError
from .limits import (
    FRAME_HEADER_SIZE,
    MAX_BATCH_PAGES,
    MAX_DISCARD_RANGES,
    MAX_FRAME_SIZE,
    MAX_INVENTORY_SLOTS,
    MAX_PAYLOAD,
    MIN_PAYLOAD,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    SEAL_SIZE,
)
from .messages import (
    BY_TYPE,
    Buffer,
    Failed,
    Held,
    Hello,
    Message,
    Ok,
    Pages,
    SwapIn,
    SwapOut,
    Welcome,
)
from .runs import check_runs, pack_runs, unpack_runs

LENGTH = struct.Struct(">I")
HEAD = struct.Struct("<BBHI")  # type, flags, count, request id
FIRST = struct.Struct("<Q")
HEAD_SIZE = HEAD.size
SEALED = 2  # flags: a seal per page follows the tags (SwapIn: send them back)
SIZED = 4  # flags: a length per payload follows the tags (without it: whole pages)
HANDSHAKE = (Hello.TYPE, Welcome.TYPE, Failed.TYPE)
_CONTROL_FIELDS: dict[int, tuple[str, ...]] = {
    code: tuple(f.name for f in dataclasses.fields(cls)[1:])  # type: ignore[arg-type]
    for code, cls in BY_TYPE.items()
    if dataclasses.is_dataclass(cls)
}
_HANDSHAKE_FIELDS = {code: tuple(f.name for f in dataclasses.fields(BY_TYPE[code]))  # type: ignore[arg-type]
                     for code in HANDSHAKE}  # fmt: skip
# Largest array in a control message: a Discard's ranges or a Stats reply's counters.
_MAX_ARRAY = max(MAX_DISCARD_RANGES, 256, 16)
_OK = (Ok.TYPE, 0, 0)


# -- encoding ------------------------------------------------------------------
def _frame(head: bytes, parts: Sequence[Buffer], size: int) -> list[Buffer]:
    length = len(head) + size
    if length > MAX_FRAME_SIZE:
        raise LocalProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME_SIZE}")
    return [LENGTH.pack(length) + head, *parts]


def _runs_field(runs: Sequence[range]) -> bytes:
    """How many runs, then the runs."""
    return FIRST.pack(len(runs)) + pack_runs(runs)


def swap_out_parts(
    request_id: int,
    runs: Sequence[range],
    generations: array[int],
    tags: array[int],
    seals: Buffer | None,
    pages: Sequence[Buffer],
) -> list[Buffer]:
    """The frame of a SwapOut as buffers to send in order, one payload per buffer as
    given (the agent's views): no join, no per-payload copy. A payload's length is its
    buffer's (bytes); when every one is a whole page the frame carries no lengths.
    Checks the shape a store checks; the caller vouches for the values, as it made
    them."""
    n = sum(len(run) for run in runs)
    sizes = list(map(len, pages))
    size = sum(sizes)
    if not 1 <= n <= MAX_BATCH_PAGES or len(sizes) != n:
        raise LocalProtocolError(f"a SwapOut of {n} slots with {len(sizes)} payloads")
    if min(sizes) < MIN_PAYLOAD or max(sizes) > MAX_PAYLOAD:
        raise LocalProtocolError(f"a payload is {MIN_PAYLOAD}..{MAX_PAYLOAD} bytes")
    # Each at most a page, and n pages in all: each a whole page (no lengths).
    lengths = None if size == n * PAGE_SIZE else array("H", sizes)
    return _swap_out_frame(request_id, runs, n, generations, tags, seals, lengths, pages, size)


def _swap_out_frame(
    request_id: int,
    runs: Sequence[range],
    n: int,
    generations: array[int],
    tags: array[int],
    seals: Buffer | None,
    lengths: array[int] | None,
    payloads: Sequence[Buffer],
    size: int,
) -> list[Buffer]:
    sealed = seals is not None and len(seals) != n * SEAL_SIZE
    if len(tags) != n or len(generations) != n or sealed:
        raise LocalProtocolError("one tag, generation and seal per page")
    flags = (SEALED if seals is not None else 0) | (SIZED if lengths is not None else 0)
    head = HEAD.pack(SwapOut.TYPE, flags, n, request_id)
    head += _runs_field(runs) + generations.tobytes() + tags.tobytes()
    if lengths is not None:
        head += lengths.tobytes()
    body = [seals, *payloads] if seals is not None else payloads
    return _frame(head, body, size + (len(seals) if seals is not None else 0))


def encode_parts(message: Message) -> list[Buffer]:
    """The message's frame as buffers to write in order; a batch's pages are their
    own buffer (transport.writelines, socket.sendmsg)."""
    if isinstance(message, SwapOut):
        n = len(message.tags)
        return _swap_out_frame(message.request_id, message.runs, n, message.generations,
                               message.tags, message.seals, message.sized_lengths,
                               [message.data], len(message.data))  # fmt: skip
    if isinstance(message, Pages):
        sealed, lengths = message.seals is not None, message.sized_lengths
        flags = (SEALED if sealed else 0) | (SIZED if lengths is not None else 0)
        head = HEAD.pack(Pages.TYPE, flags, len(message.tags), message.request_id)
        head += message.generations.tobytes() + message.tags.tobytes()
        if lengths is not None:
            head += lengths.tobytes()
        if message.seals is not None:
            return _frame(head, [message.seals, message.data],
                          len(message.seals) + len(message.data))  # fmt: skip
        return _frame(head, [message.data], len(message.data))
    return [encode(message)]


def encode(message: Message) -> bytes:
    """Serialize one message into one complete frame (length prefix included)."""
    if not isinstance(message, Message) or type(message).TYPE not in BY_TYPE:
        raise LocalProtocolError(f"not a netswap message: {message!r}")
    if isinstance(message, (SwapOut, Pages)):
        return b"".join(encode_parts(message))
    if isinstance(message, (Hello, Welcome)):  # only ever the handshake's
        return encode_handshake(message)
    rid = message.request_id
    if isinstance(message, Ok):
        body = HEAD.pack(Ok.TYPE, 0, 0, rid)
    elif isinstance(message, SwapIn):
        sealed = SEALED if message.sealed else 0
        count = sum(len(run) for run in message.runs)
        body = HEAD.pack(SwapIn.TYPE, sealed, count, rid) + _runs_field(message.runs)
    elif isinstance(message, Held):
        body = HEAD.pack(Held.TYPE, 0, len(message.slots), rid)
        body += message.slots.tobytes() + message.generations.tobytes()
        body += message.lengths.tobytes()
    else:
        fields = [getattr(message, name) for name in _CONTROL_FIELDS[message.TYPE]]
        body = HEAD.pack(message.TYPE, 0, 0, rid) + msgpack.packb(fields, use_bin_type=True)
    return _checked(body)


def encode_ok(request_id: int) -> bytes:
    """Ok's frame: the store's answer to every SwapOut, so it skips the dispatch."""
    return LENGTH.pack(HEAD_SIZE) + HEAD.pack(Ok.TYPE, 0, 0, request_id)


def encode_handshake(message: Hello | Welcome | Failed) -> bytes:
    """A Hello, or the answer to one, in protocol 2's layout (a msgpack array)."""
    fields = [getattr(message, f.name) for f in dataclasses.fields(message)]
    return _checked(msgpack.packb([message.TYPE, *fields], use_bin_type=True))


def _checked(body: bytes) -> bytes:
    if len(body) > MAX_FRAME_SIZE:
        raise LocalProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_SIZE}")
    return LENGTH.pack(len(body)) + body


# -- decoding ------------------------------------------------------------------
def frame_length(header: Buffer, limit: int = MAX_FRAME_SIZE, offset: int = 0) -> int:
    """Body length announced by a frame header; rejects oversized frames at once."""
    (length,) = LENGTH.unpack_from(header, offset)
    if length == 0 or length > limit:
        raise RemoteProtocolError(f"frame length {length} outside 1..{limit}")
    return int(length)


def decode(body: memoryview) -> Message:
    """Parse one frame body (after the handshake) into a validated message. A batch's
    pages and seals are views into `body`."""
    if len(body) < HEAD_SIZE:
        raise RemoteProtocolError(f"frame body of {len(body)} bytes has no head")
    kind, flags, count, rid = HEAD.unpack_from(body)
    if (kind, flags, count) == _OK:
        if len(body) != HEAD_SIZE:
            raise RemoteProtocolError("an Ok carries nothing")
        return Ok(rid)
    try:
        if kind == SwapOut.TYPE:
            return _swap_out(body, flags, count, rid)
        if kind == SwapIn.TYPE:
            return _swap_in(body, flags, count, rid)
        if kind == Pages.TYPE:
            return _pages(body, flags, count, rid)
        if kind == Held.TYPE:
            return _held(body, count, rid)
        return _control(body, kind, rid)
    except LocalProtocolError as exc:
        name = BY_TYPE[kind].__name__ if kind in BY_TYPE else f"type {kind}"
        raise RemoteProtocolError(f"invalid {name}: {exc}") from None


def _array(typecode: str, data: memoryview) -> array[int]:
    """Packed little-endian integers as an array (one copy, in C)."""
    out = array(typecode)
    out.frombytes(data)
    return out


def _sized(body: memoryview, expected: int, what: str) -> None:
    if len(body) != expected:
        raise RemoteProtocolError(f"{what} of {len(body)} bytes, its head says {expected}")


def _runs(body: memoryview, n: int) -> tuple[tuple[range, ...], int]:
    """A batch's runs (checked: they hold n distinct slots) and where they end."""
    if len(body) < HEAD_SIZE + 8:
        raise RemoteProtocolError("a batch without its runs")
    (count,) = FIRST.unpack_from(body, HEAD_SIZE)
    end = HEAD_SIZE + 8 + 8 * count
    if not 1 <= count <= n or len(body) < end:
        raise RemoteProtocolError(f"{count} runs for {n} pages")
    runs = unpack_runs(_array("Q", body[HEAD_SIZE + 8 : end]))
    if check_runs(runs) != n:
        raise RemoteProtocolError(f"runs of {sum(len(r) for r in runs)} slots, head says {n}")
    return runs, end


def _lengths(body: memoryview, n: int, at: int) -> tuple[array[int] | None, int, int]:
    """A batch's lengths (SIZED says they are at `at`): the lengths, where they end, and
    the payloads' size in all. The values are checked by the message (1..PAGE_SIZE
    each); here only that they are there."""
    if len(body) < at + 2 * n:
        raise RemoteProtocolError(f"a batch of {n} payloads without their lengths")
    lengths = _array("H", body[at : at + 2 * n])
    return lengths, at + 2 * n, sum(lengths)


def _swap_out(body: memoryview, flags: int, n: int, rid: int) -> SwapOut:
    if flags & ~(SEALED | SIZED) or not 1 <= n <= MAX_BATCH_PAGES:
        raise RemoteProtocolError(f"SwapOut: flags {flags}, {n} pages")
    runs, at = _runs(body, n)
    if flags & SIZED:
        lengths, end, size = _lengths(body, n, at + 12 * n)
    else:  # whole pages (no call, no tuple: the common frame)
        lengths, end, size = None, at + 12 * n, n * PAGE_SIZE
    seals = SEAL_SIZE * n if flags & SEALED else 0
    _sized(body, end + seals + size, "SwapOut")
    gens = _array("Q", body[at : at + 8 * n])
    tags = _array("I", body[at + 8 * n : at + 12 * n])
    seal = body[end : end + seals] if seals else None
    return SwapOut(rid, runs, body[end + seals :], tags, gens, seal, lengths)


def _swap_in(body: memoryview, flags: int, n: int, rid: int) -> SwapIn:
    if flags & ~SEALED or not 1 <= n <= MAX_BATCH_PAGES:
        raise RemoteProtocolError(f"SwapIn: flags {flags}, {n} pages")
    runs, at = _runs(body, n)
    _sized(body, at, "SwapIn")
    return SwapIn(rid, runs, bool(flags & SEALED))


def _pages(body: memoryview, flags: int, n: int, rid: int) -> Pages:
    if flags & ~(SEALED | SIZED) or not 1 <= n <= MAX_BATCH_PAGES:
        raise RemoteProtocolError(f"Pages: flags {flags}, {n} pages")
    at = HEAD_SIZE
    if flags & SIZED:
        lengths, end, size = _lengths(body, n, at + 12 * n)
    else:
        lengths, end, size = None, at + 12 * n, n * PAGE_SIZE
    seals = SEAL_SIZE * n if flags & SEALED else 0
    _sized(body, end + seals + size, "Pages")
    gens = _array("Q", body[at : at + 8 * n])
    tags = _array("I", body[at + 8 * n : at + 12 * n])
    seal = body[end : end + seals] if seals else None
    return Pages(rid, body[end + seals :], tags, gens, seal, lengths)


def _held(body: memoryview, n: int, rid: int) -> Held:
    if n > MAX_INVENTORY_SLOTS:
        raise RemoteProtocolError(f"Held: {n} slots")
    _sized(body, HEAD_SIZE + 18 * n, "Held")
    at = HEAD_SIZE
    slots = _array("Q", body[at : at + 8 * n])
    gens = _array("Q", body[at + 8 * n : at + 16 * n])
    return Held(rid, slots, gens, _array("H", body[at + 16 * n :]))


def _control(body: memoryview, kind: int, rid: int) -> Message:
    fields = _CONTROL_FIELDS.get(kind)
    if fields is None:
        raise RemoteProtocolError(f"unknown message type {kind}")
    values = _unpack(body[HEAD_SIZE:])
    if type(values) is not tuple or len(values) != len(fields):
        raise RemoteProtocolError(f"{BY_TYPE[kind].__name__} takes {len(fields)} fields")
    return BY_TYPE[kind](rid, *values)  # type: ignore[call-arg]


def _unpack(data: Buffer) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_bin_len=MAX_FRAME_SIZE,
            max_str_len=MAX_FRAME_SIZE,
            max_array_len=_MAX_ARRAY,
            max_map_len=0,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise RemoteProtocolError(f"undecodable frame: {exc.__class__.__name__}") from None


def decode_handshake(body: Buffer) -> Message:
    """A Hello or its answer, in protocol 2's layout (anything else is an error)."""
    try:
        obj = _unpack(body)
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(f"the first frame must be a Hello ({exc})") from None
    if type(obj) is not tuple or len(obj) < 2 or obj[0] not in HANDSHAKE:
        raise RemoteProtocolError("the first frame must be a Hello, and then its answer")
    cls, fields = BY_TYPE[obj[0]], obj[1:]
    if cls is Welcome and len(fields) > 1 and fields[1] != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"the store answered in protocol {fields[1]!r:.20}; this "
                                  f"client speaks protocol {PROTOCOL_VERSION}")  # fmt: skip
    if cls is Welcome and len(fields) != len(_HANDSHAKE_FIELDS[Welcome.TYPE]):
        raise RemoteProtocolError(f"Welcome with {len(fields)} fields")  # no defaults there
    hello = len(_HANDSHAKE_FIELDS[Hello.TYPE])
    if cls is Hello and len(fields) > hello and fields[1] != PROTOCOL_VERSION:
        # A later protocol's Hello may carry more: its first fields still say its
        # version, and the store answers EPROTONOSUPPORT in one line.
        fields = fields[:hello]
    try:
        return cls(*fields)
    except TypeError:
        raise RemoteProtocolError(f"{cls.__name__} with {len(obj) - 1} fields") from None
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"invalid {cls.__name__}: {exc}") from None


HEADER_SIZE = FRAME_HEADER_SIZE
