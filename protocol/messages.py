"""One class per message, each validated as it is built.

Requests flow client -> store, replies store -> client; every message carries a
request id so replies may come back in any order. Validation raises
LocalProtocolError; the decoder turns that into RemoteProtocolError when the
message came off the wire.

Control messages (Hello, Swapfile, Discard, ...) are frozen dataclasses. The
batches -- SwapOut, SwapIn, Pages, Held -- are slotted classes whose fields are
packed arrays, not lists of small objects: a batch's slots are runs of
consecutive slots (runs.py), its generations an array('Q'), its tags an
array('I'), its pages one buffer of payloads back to back and, when the writer
encrypts, one SEAL_SIZE seal per payload. A payload is 1..PAGE_SIZE bytes that
only the agent understands (limits.py); `lengths` (array('H')) says how long
each is, and a batch of whole pages keeps none (`sized` is False: the common
case costs no lengths, on the wire or here).
A page's tag is a CRC32 bound to the area, the slot and the generation
(checksum.py). Off the wire, `data` and `seals` are views into the receiving
connection's buffer (connection.py says how long they stay valid).
"""

from __future__ import annotations

import errno
import itertools
import re
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from .errors import LocalProtocolError
from .limits import (
    MAX_AREA_NAME,
    MAX_BATCH_PAGES,
    MAX_DISCARD_RANGES,
    MAX_GENERATION,
    MAX_HOLDER,
    MAX_INVENTORY_SLOTS,
    MAX_PAYLOAD,
    MAX_REASON_SIZE,
    MAX_REQUEST_ID,
    MAX_SLOTS,
    MAX_STAT_NAME,
    MAX_STATS_ENTRIES,
    MAX_TOKEN_SIZE,
    MIN_PAYLOAD,
    PAGE_SIZE,
    SEAL_SIZE,
)
from .runs import check_runs, flat, runs_of

Buffer = bytes | bytearray | memoryview

_AREA_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\Z")


def area_name_ok(name: str) -> bool:
    """An area name: a letter or digit, then letters, digits, '.', '_', '-' (at most
    MAX_AREA_NAME bytes). No ':', '{', '}' or glob character: an area's keys and ACL
    patterns on a Redis tier name exactly one area."""
    return len(name.encode()) <= MAX_AREA_NAME and _AREA_NAME.match(name) is not None


_MAX_U32 = (1 << 32) - 1
_MAX_U64 = (1 << 64) - 1


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise LocalProtocolError(what)


def _is_int(value: object, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _ints_within(values: Sequence[int], low: int, high: int) -> bool:
    """Every value in [low, high]: min/max run in C over an array or a range."""
    return not values or (low <= min(values) and max(values) <= high)


def _check_holder(holder: object) -> None:
    """A holder is printable text of at most MAX_HOLDER bytes ("": nobody named)."""
    ok = type(holder) is str and len(holder.encode()) <= MAX_HOLDER and holder.isprintable()
    _check(ok, f"a holder is printable text of at most {MAX_HOLDER} bytes, not {holder!r:.40}")


def _check_request_id(request_id: object) -> None:
    if not _is_int(request_id, 0, MAX_REQUEST_ID):
        raise LocalProtocolError(f"request_id must be a uint32, got {request_id!r}")


def _check_pages(
    n: int,
    data: Buffer,
    tags: Sequence[int],
    gens: Sequence[int],
    seals: Buffer | None,
    lengths: array[int] | None,
) -> None:
    if lengths is None:
        if len(data) != n * PAGE_SIZE:
            raise LocalProtocolError(f"data must be {n} x {PAGE_SIZE} bytes, not {len(data)}")
    else:
        _check_lengths(n, lengths)
        if sum(lengths) != len(data):
            raise LocalProtocolError(f"payloads of {sum(lengths)} bytes in all, data of "
                                     f"{len(data)}")  # fmt: skip
    if len(tags) != n or len(gens) != n:
        raise LocalProtocolError("one tag and one generation per page")
    if seals is not None and len(seals) != n * SEAL_SIZE:
        raise LocalProtocolError(f"seals must be {n} x {SEAL_SIZE} bytes")
    if not _ints_within(tags, 0, _MAX_U32) or not _ints_within(gens, 0, MAX_GENERATION):
        raise LocalProtocolError("tags are uint32 and generations uint64")


def _check_lengths(n: int, lengths: array[int]) -> None:
    if len(lengths) != n:
        raise LocalProtocolError(f"{len(lengths)} lengths for {n} payloads")
    if not _ints_within(lengths, MIN_PAYLOAD, MAX_PAYLOAD):
        bad = min(lengths) if min(lengths) < MIN_PAYLOAD else max(lengths)
        raise LocalProtocolError(f"a payload is {MIN_PAYLOAD}..{MAX_PAYLOAD} bytes, not {bad}")


def _sized(lengths: Sequence[int] | None, n: int) -> array[int] | None:
    """n lengths as an array('H'), or None when every payload is a whole page (the form
    a batch of whole pages keeps: no lengths). A value beyond a u16 is refused here."""
    if lengths is None:
        return None
    try:
        packed = _packed("H", lengths)
    except OverflowError:
        raise LocalProtocolError("a payload length is a u16") from None
    if len(packed) != n:
        raise LocalProtocolError(f"{len(packed)} lengths for {n} payloads")
    if n and min(packed) == PAGE_SIZE == max(packed):
        return None
    return packed


def _whole(n: int) -> array[int]:
    return array("H", [PAGE_SIZE]) * n


def _offsets(n: int, lengths: array[int] | None) -> array[int]:
    """Where each payload starts in `data`, and (last) where they end: n + 1 offsets."""
    if lengths is None:
        return array("Q", range(0, (n + 1) * PAGE_SIZE, PAGE_SIZE))
    return array("Q", itertools.accumulate(lengths, initial=0))


def _packed(typecode: str, values: Sequence[int]) -> array[int]:
    """Integers as an array of `typecode` (bytes count as integers, not raw memory)."""
    if isinstance(values, array) and values.typecode == typecode:
        return values
    return array(typecode, list(values) if isinstance(values, (bytes, bytearray)) else values)


def _u64s(values: Sequence[int]) -> array[int]:
    return _packed("Q", values)


def _u32s(values: Sequence[int]) -> array[int]:
    return _packed("I", values)


def _bytes(value: Buffer | None) -> bytes | None:
    return None if value is None else bytes(value)


class Message:
    """Base of every message; TYPE is its code on the wire."""

    __slots__ = ()
    TYPE: ClassVar[int]
    request_id: int


class Request(Message):
    """Sent by the client (the agent or plugin) to a page store."""

    __slots__ = ()


class Reply(Message):
    """Sent by the page store in answer to exactly one request."""

    __slots__ = ()


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
        _check(type(self.area) is str and area_name_ok(self.area), f"bad area name {self.area!r}")
        _check(type(self.token) is str and len(self.token.encode()) <= MAX_TOKEN_SIZE, "bad token")


@dataclass(frozen=True, slots=True)
class Swapfile(Request):
    """->swapfile(1) / ->swapfile(0): reserve an area of `slots` slots, or release it.

    `area_id` names this life of the area (0: any, the old behaviour) and `holder` the
    host that holds it: an area of another life held by another host is refused
    EEXIST, and so is its release, unless `force` (service.py says the whole rule)."""

    TYPE: ClassVar[int] = 2
    request_id: int
    activate: bool
    slots: int
    page_size: int = PAGE_SIZE
    area_id: int = 0
    holder: str = ""
    force: bool = False

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check(type(self.activate) is bool, "activate is a bool")
        _check(_is_int(self.slots, 0, MAX_SLOTS), f"slots must be 0..{MAX_SLOTS}")
        ps = self.page_size
        _check(_is_int(ps, 512, 1 << 16) and ps & (ps - 1) == 0, "page_size: power of 2")
        _check(_is_int(self.area_id, 0, _MAX_U64), "area_id is a uint64")
        _check_holder(self.holder)
        _check(type(self.force) is bool, "force is a bool")


@dataclass(frozen=True, slots=True)
class Fence(Request):
    """Bind this connection to `epoch`, the agent's: the area's floor rises to it, and
    no connection of the area below the floor changes anything any more (ESTALE). An
    epoch below the floor is refused ESTALE and leaves the connection as it was."""

    TYPE: ClassVar[int] = 9
    request_id: int
    epoch: int

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check(_is_int(self.epoch, 0, _MAX_U64), "epoch is a uint64")


def _batch_key(message: Message) -> tuple[Any, ...]:
    """A batch's fields as plain values, for equality and repr (batches are not
    dataclasses: their fields are arrays and views, and mypyc compiles slotted
    classes of single inheritance)."""
    if isinstance(message, SwapOut):
        return (message.request_id, tuple(message.slots), bytes(message.data),
                tuple(message.tags), tuple(message.generations), _bytes(message.seals),
                tuple(message.lengths))  # fmt: skip
    if isinstance(message, SwapIn):
        return (message.request_id, tuple(message.slots), message.sealed)
    if isinstance(message, Pages):
        return (message.request_id, bytes(message.data), tuple(message.tags),
                tuple(message.generations), _bytes(message.seals),
                tuple(message.lengths))  # fmt: skip
    assert isinstance(message, Held)
    return (message.request_id, tuple(message.slots), tuple(message.generations),
            tuple(message.lengths))  # fmt: skip


def _same(message: Message, other: object) -> bool:
    return (
        isinstance(other, Message)
        and type(other) is type(message)
        and (_batch_key(message) == _batch_key(other))
    )


def _shown(message: Message) -> str:
    return f"{type(message).__name__}{_batch_key(message)!r}"[:200]


class _Payloads:
    """What SwapOut and Pages say of their payloads' lengths (None: all whole pages)."""

    __slots__ = ()
    _lengths: array[int] | None
    tags: array[int]

    @property
    def sized(self) -> bool:
        """Whether some payload is not a whole page (the frame carries lengths)."""
        return self._lengths is not None

    @property
    def lengths(self) -> array[int]:
        """Each payload's length (a new array of PAGE_SIZE when all are whole pages)."""
        return self._lengths if self._lengths is not None else _whole(len(self.tags))

    @property
    def sized_lengths(self) -> array[int] | None:
        """The lengths, or None when every payload is a whole page."""
        return self._lengths


class SwapOut(_Payloads, Request):
    """Store a batch of payloads: the i-th payload of `data` (lengths[i] bytes; without
    lengths, each a whole page) goes to the i-th slot of `runs`, written for
    generations[i] (nonzero), tagged tags[i]; seals[i] is kept beside it."""

    TYPE: ClassVar[int] = 3
    __slots__ = ("_lengths", "data", "generations", "request_id", "runs", "seals", "tags")

    def __init__(
        self,
        request_id: int,
        slots: Sequence[int] | tuple[range, ...],
        data: Buffer,
        tags: Sequence[int],
        generations: Sequence[int],
        seals: Buffer | None = None,
        lengths: Sequence[int] | None = None,
    ) -> None:
        _check_request_id(request_id)
        self.runs = _as_runs(slots)
        n = check_runs(self.runs)
        sized = _sized(lengths, n) if lengths is not None else None
        _check_pages(n, data, tags, generations, seals, sized)
        if 0 in generations:
            raise LocalProtocolError("generation 0 means never written")
        self.request_id = request_id
        self.data = data
        self.tags = _u32s(tags)
        self.generations = _u64s(generations)
        self.seals = seals
        self._lengths = sized

    @property
    def slots(self) -> range | array[int]:
        return flat(self.runs)

    def offsets(self) -> array[int]:
        """Where each payload starts in `data`, then where the last ends (n + 1)."""
        return _offsets(len(self.tags), self._lengths)

    def __eq__(self, other: object) -> bool:
        return _same(self, other)

    def __hash__(self) -> int:
        return hash(_batch_key(self))

    def __repr__(self) -> str:
        return _shown(self)


class SwapIn(Request):
    """Fetch a batch of pages (with their seals when `sealed`); answered by Pages."""

    TYPE: ClassVar[int] = 4
    __slots__ = ("request_id", "runs", "sealed")

    def __init__(
        self, request_id: int, slots: Sequence[int] | tuple[range, ...], sealed: bool = False
    ) -> None:
        _check_request_id(request_id)
        self.runs = _as_runs(slots)
        check_runs(self.runs)
        self.request_id = request_id
        self.sealed = sealed

    @property
    def slots(self) -> range | array[int]:
        return flat(self.runs)

    def __eq__(self, other: object) -> bool:
        return _same(self, other)

    def __hash__(self) -> int:
        return hash(_batch_key(self))

    def __repr__(self) -> str:
        return _shown(self)


def _as_runs(slots: Sequence[int] | tuple[range, ...]) -> tuple[range, ...]:
    """Runs as given (a tuple of ranges), or the runs of a sequence of slots."""
    if isinstance(slots, tuple) and slots and isinstance(slots[0], range):
        return cast("tuple[range, ...]", slots)
    return runs_of(cast("Sequence[int]", slots))


@dataclass(frozen=True, slots=True)
class Inventory(Request):
    """Which slots of first..first+count-1 the store holds for this area, and at which
    generations (answered by Held): what a restarted agent rebuilds its map from."""

    TYPE: ClassVar[int] = 8
    request_id: int
    first: int
    count: int

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check(_is_int(self.first, 0, MAX_SLOTS - 1), "first slot out of range")
        _check(_is_int(self.count, 1, MAX_INVENTORY_SLOTS), f"count is 1..{MAX_INVENTORY_SLOTS}")


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
    """Answer to Hello: the store's version, the area's size in slots (0: inactive),
    and the store's capacity in pages. Then who answers: `store_id`, the store's
    identity (a file store's lasts as long as its directory); `boot`, new at every
    start of the store's process; `prev_boot`, the boot of the process before it on
    that directory (0: none, or a memory store); `clean`, whether that process ended
    with every acknowledged write flushed. Then the area's record: `area_id`, the life
    of the area, `holder`, the host that holds it (0 and "" with no area), and
    `floor`, the highest epoch any connection of the area has fenced with (Fence:
    it outlives a release of the area)."""

    TYPE: ClassVar[int] = 66
    request_id: int
    version: int
    area_slots: int
    capacity_pages: int
    store_id: int = 0
    boot: int = 0
    prev_boot: int = 0
    clean: bool = False
    area_id: int = 0
    holder: str = ""
    floor: int = 0

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        _check(_is_int(self.version, 0, _MAX_U32), "version is a uint32")
        _check(_is_int(self.area_slots, 0, MAX_SLOTS), "area_slots out of range")
        _check(_is_int(self.capacity_pages, 0, _MAX_U64), "capacity_pages out of range")
        for name in ("store_id", "boot", "prev_boot", "area_id", "floor"):
            _check(_is_int(getattr(self, name), 0, _MAX_U64), f"{name} is a uint64")
        _check(type(self.clean) is bool, "clean is a bool")
        _check_holder(self.holder)


class Pages(_Payloads, Reply):
    """Answer to SwapIn: the payloads in request order, back to back in `data`, with
    their stored generations, tags and lengths (a slot never written reads as a page
    of zeros at generation 0), and their seals when the SwapIn asked for them (zeros
    for a payload stored without one). payload(i) is the i-th payload's view."""

    TYPE: ClassVar[int] = 67
    __slots__ = ("_lengths", "_offsets", "data", "generations", "request_id", "seals", "tags")

    def __init__(
        self,
        request_id: int,
        data: Buffer,
        tags: Sequence[int],
        generations: Sequence[int],
        seals: Buffer | None = None,
        lengths: Sequence[int] | None = None,
    ) -> None:
        _check_request_id(request_id)
        n = len(tags)
        if not 1 <= n <= MAX_BATCH_PAGES:
            raise LocalProtocolError(f"1..{MAX_BATCH_PAGES} pages")
        sized = _sized(lengths, n) if lengths is not None else None
        _check_pages(n, data, tags, generations, seals, sized)
        self.request_id = request_id
        self.data = data
        self.tags = _u32s(tags)
        self.generations = _u64s(generations)
        self.seals = seals
        self._lengths = sized
        self._offsets: array[int] | None = None

    def offsets(self) -> array[int]:
        """Where each payload starts in `data`, then where the last ends (n + 1)."""
        if self._offsets is None:
            self._offsets = _offsets(len(self.tags), self._lengths)
        return self._offsets

    def payload(self, i: int) -> memoryview:
        """The i-th payload, a view of `data` (valid as long as `data` is)."""
        if self._lengths is None:
            return memoryview(self.data)[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        offsets = self.offsets()
        return memoryview(self.data)[offsets[i] : offsets[i + 1]]

    def __eq__(self, other: object) -> bool:
        return _same(self, other)

    def __hash__(self) -> int:
        return hash(_batch_key(self))

    def __repr__(self) -> str:
        return _shown(self)


class Held(Reply):
    """Answer to Inventory: the slots held, ascending, each with its generation and its
    payload's length (PAGE_SIZE: a whole page; a rebuild learns the rest without
    reading them). Without lengths, every payload is a whole page."""

    TYPE: ClassVar[int] = 69
    __slots__ = ("generations", "lengths", "request_id", "slots")

    def __init__(
        self,
        request_id: int,
        slots: Sequence[int],
        generations: Sequence[int],
        lengths: Sequence[int] | None = None,
    ) -> None:
        _check_request_id(request_id)
        n = len(slots)
        if n > MAX_INVENTORY_SLOTS or len(generations) != n:
            raise LocalProtocolError("one generation per slot, at most MAX_INVENTORY_SLOTS")
        if not _ints_within(slots, 0, MAX_SLOTS - 1):
            raise LocalProtocolError("slot out of range")
        if not _ints_within(generations, 0, MAX_GENERATION):
            raise LocalProtocolError("generations are uint64")
        sized = _sized(lengths, n) if lengths is not None else None
        if sized is not None:
            _check_lengths(n, sized)
        self.request_id = request_id
        self.slots = _u64s(slots)
        self.generations = _u64s(generations)
        self.lengths = sized if sized is not None else _whole(n)

    def __eq__(self, other: object) -> bool:
        return _same(self, other)

    def __hash__(self) -> int:
        return hash(_batch_key(self))

    def __repr__(self) -> str:
        return _shown(self)


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


REQUESTS: tuple[type[Request], ...] = (
    Hello, Swapfile, SwapOut, SwapIn, Discard, Flush, Stats, Inventory, Fence,
)  # fmt: skip
REPLIES: tuple[type[Reply], ...] = (Ok, Failed, Welcome, Pages, StatsReply, Held)
BATCHES: tuple[type[Message], ...] = (SwapOut, SwapIn, Pages, Held)
BY_TYPE: dict[int, type[Message]] = {cls.TYPE: cls for cls in REQUESTS + REPLIES}
