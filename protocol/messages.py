"""One frozen dataclass per message, each validated as it is built.

Requests flow client -> store, replies store -> client; every message carries a
request id so replies may come back in any order. Validation raises
LocalProtocolError; the decoder turns that into RemoteProtocolError when the
message came off the wire. Pages travel as one contiguous `data` blob of
len(slots) * PAGE_SIZE bytes with one tag per page (a CRC32 bound to the
area, the slot and the write generation: checksum.py) and, on SwapOut, one
generation byte per page, so a batch is a few msgpack values and never a list
of small objects.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, cast

from .checksum import NEVER_WRITTEN
from .errors import LocalProtocolError
from .limits import (
    MAX_AREA_NAME,
    MAX_BATCH_PAGES,
    MAX_DISCARD_RANGES,
    MAX_REASON_SIZE,
    MAX_REQUEST_ID,
    MAX_SLOTS,
    MAX_STAT_NAME,
    MAX_STATS_ENTRIES,
    MAX_TOKEN_SIZE,
    PAGE_SIZE,
)

_AREA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")
_MAX_U32 = (1 << 32) - 1
_MAX_U64 = (1 << 64) - 1


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise LocalProtocolError(what)


def _is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _all_ints(values: tuple[object, ...], low: int, high: int) -> bool:
    """Every value an int (not bool) in [low, high]: set/min/max run in C, which
    matters for 256-slot batches validated on both ends of every RPC."""
    if not values:
        return True
    if {type(v) for v in values} != {int}:
        return False
    ints = cast("tuple[int, ...]", values)
    return low <= min(ints) and max(ints) <= high


def _check_request_id(request_id: object) -> None:
    if not _is_int(request_id, 0, MAX_REQUEST_ID):
        raise LocalProtocolError(f"request_id must be a uint32, got {request_id!r}")


# The batch checks run twice per RPC on each end's hot path, so each first tries one
# condition with no message built (an f-string per check cost as much as the checks);
# only a failure walks the checks one by one for the message that names the fault.


def _check_slots(slots: object) -> None:
    if (
        type(slots) is tuple
        and 1 <= len(slots) <= MAX_BATCH_PAGES
        and _all_ints(slots, 0, MAX_SLOTS - 1)
        and len(set(slots)) == len(slots)
    ):
        return
    _check(type(slots) is tuple, "slots must be a tuple")
    assert isinstance(slots, tuple)
    _check(1 <= len(slots) <= MAX_BATCH_PAGES, f"a batch holds 1..{MAX_BATCH_PAGES} slots")
    _check(_all_ints(slots, 0, MAX_SLOTS - 1), "slot out of range")
    _check(len(set(slots)) == len(slots), "duplicate slot in one batch")


def _check_pages(data: object, tags: object, count: int) -> None:
    # A sender may hand over the bytearray it filled (the store's SwapIn) rather than
    # copy it into bytes; what comes off the wire is always bytes.
    if (
        (type(data) is bytes or type(data) is bytearray)
        and len(data) == count * PAGE_SIZE
        and type(tags) is tuple
        and len(tags) == count
        and _all_ints(tags, 0, _MAX_U32)
    ):
        return
    _check(type(data) is bytes or type(data) is bytearray, "data must be bytes")
    assert isinstance(data, (bytes, bytearray))
    _check(len(data) == count * PAGE_SIZE, f"data must be {count} x {PAGE_SIZE} bytes")
    _check(type(tags) is tuple and len(tags) == count, "one tag per page")
    assert isinstance(tags, tuple)
    _check(_all_ints(tags, 0, _MAX_U32), "tags are uint32")


class Message:
    """Base of every message; TYPE is its code on the wire."""

    TYPE: ClassVar[int]
    request_id: int


class Request(Message):
    """Sent by the client (the agent or plugin) to a page store."""


class Reply(Message):
    """Sent by the page store in answer to exactly one request."""


@dataclass(frozen=True, slots=True)
class Hello(Request):
    """First request on a connection: binds it to one area, authenticated by token."""

    TYPE: ClassVar[int] = 1
    request_id: int
    version: int
    area: str
    token: str = ""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check(_is_int(self.version, 0, _MAX_U32), "version is a uint32")
        _check(type(self.area) is str and len(self.area.encode()) <= MAX_AREA_NAME, "bad area")
        _check(_AREA_NAME.match(self.area) is not None, f"bad area name {self.area!r}")
        _check(type(self.token) is str and len(self.token.encode()) <= MAX_TOKEN_SIZE, "bad token")


@dataclass(frozen=True, slots=True)
class Swapfile(Request):
    """->swapfile(1) / ->swapfile(0): reserve an area of `pages` slots, or release it."""

    TYPE: ClassVar[int] = 2
    request_id: int
    activate: bool
    pages: int
    page_size: int = PAGE_SIZE

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check(type(self.activate) is bool, "activate is a bool")
        _check(_is_int(self.pages, 0, MAX_SLOTS), f"pages must be 0..{MAX_SLOTS}")
        ps = self.page_size
        _check(_is_int(ps, 512, 1 << 16) and ps & (ps - 1) == 0, "page_size: power of 2")


@dataclass(frozen=True, slots=True)
class SwapOut(Request):
    """Store a batch of pages: data[i*PAGE_SIZE:(i+1)*PAGE_SIZE] goes to slots[i],
    written for the generations[i]-th time (1..255), with tags[i] bound to both."""

    TYPE: ClassVar[int] = 3
    request_id: int
    slots: tuple[int, ...]
    data: bytes
    tags: tuple[int, ...]
    generations: bytes

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_slots(self.slots)
        _check_pages(self.data, self.tags, len(self.slots))
        gens = self.generations
        _check(type(gens) is bytes and len(gens) == len(self.slots), "one generation per page")
        _check(NEVER_WRITTEN not in gens, "generations are 1..255 (0 is never written)")


@dataclass(frozen=True, slots=True)
class SwapIn(Request):
    """Fetch a batch of pages; answered by Pages (never-written slots read as zeros)."""

    TYPE: ClassVar[int] = 4
    request_id: int
    slots: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check_slots(self.slots)


@dataclass(frozen=True, slots=True)
class Discard(Request):
    """Free slot ranges (start, count): swap discard / NBD trim."""

    TYPE: ClassVar[int] = 5
    request_id: int
    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check(type(self.ranges) is tuple, "ranges must be a tuple")
        _check(1 <= len(self.ranges) <= MAX_DISCARD_RANGES, "1..MAX_DISCARD_RANGES ranges")
        for r in self.ranges:
            _check(type(r) is tuple and len(r) == 2, "a range is (start, count)")
            start, count = r
            _check(_is_int(start, 0, MAX_SLOTS - 1), "range start out of range")
            _check(_is_int(count, 1, MAX_SLOTS - start), "range count out of range")


@dataclass(frozen=True, slots=True)
class Flush(Request):
    """Make every acknowledged SwapOut durable (fsync on the file backend)."""

    TYPE: ClassVar[int] = 6
    request_id: int

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)


@dataclass(frozen=True, slots=True)
class Stats(Request):
    """Ask for the store's counters."""

    TYPE: ClassVar[int] = 7
    request_id: int

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)


@dataclass(frozen=True, slots=True)
class Ok(Reply):
    """Success of a Swapfile, SwapOut, Discard or Flush."""

    TYPE: ClassVar[int] = 64
    request_id: int

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)


@dataclass(frozen=True, slots=True)
class Failed(Reply):
    """Failure of any request, with an errno code (ENOSPC, EINVAL, EPERM, EIO, ...)."""

    TYPE: ClassVar[int] = 65
    request_id: int
    errno: int
    reason: str = ""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check(_is_int(self.errno, 1, 4095), "errno must be 1..4095")
        _check(type(self.reason) is str and len(self.reason) <= MAX_REASON_SIZE, "bad reason")

    @property
    def errno_name(self) -> str:
        return errno.errorcode.get(self.errno, f"E{self.errno}")


@dataclass(frozen=True, slots=True)
class Welcome(Reply):
    """Answer to Hello: the store's version and the area's current size (0: inactive)."""

    TYPE: ClassVar[int] = 66
    request_id: int
    version: int
    area_pages: int
    capacity_pages: int

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check(_is_int(self.version, 0, _MAX_U32), "version is a uint32")
        _check(_is_int(self.area_pages, 0, MAX_SLOTS), "area_pages out of range")
        _check(_is_int(self.capacity_pages, 0, _MAX_U64), "capacity_pages out of range")


@dataclass(frozen=True, slots=True)
class Pages(Reply):
    """Answer to SwapIn: the pages in request order, with their stored tags (a slot
    never written reads as zeros tagged for generation 0)."""

    TYPE: ClassVar[int] = 67
    request_id: int
    data: bytes  # received: always bytes; a store may send the bytearray it filled
    tags: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check(type(self.tags) is tuple, "tags must be a tuple")
        count = len(self.tags)
        _check(1 <= count <= MAX_BATCH_PAGES, "1..MAX_BATCH_PAGES pages")
        _check_pages(self.data, self.tags, count)


@dataclass(frozen=True, slots=True)
class StatsReply(Reply):
    """Answer to Stats: named non-negative counters."""

    TYPE: ClassVar[int] = 68
    request_id: int
    values: tuple[tuple[str, int], ...]

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check(type(self.values) is tuple and len(self.values) <= MAX_STATS_ENTRIES, "values")
        for item in self.values:
            _check(type(item) is tuple and len(item) == 2, "a stat is (name, value)")
            name, value = item
            _check(type(name) is str and 0 < len(name) <= MAX_STAT_NAME, "bad stat name")
            _check(_is_int(value, 0, _MAX_U64), "stat values are uint64")

    @classmethod
    def from_mapping(cls, request_id: int, values: Mapping[str, int]) -> StatsReply:
        return cls(request_id, tuple(sorted(values.items())))

    def as_dict(self) -> dict[str, int]:
        return dict(self.values)


REQUESTS: tuple[type[Request], ...] = (Hello, Swapfile, SwapOut, SwapIn, Discard, Flush, Stats)
REPLIES: tuple[type[Reply], ...] = (Ok, Failed, Welcome, Pages, StatsReply)
BY_TYPE: dict[int, type[Message]] = {cls.TYPE: cls for cls in REQUESTS + REPLIES}
