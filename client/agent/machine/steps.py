"""What the machine's long tasks (a resync, a rebuild) ask of the world, and what comes back.

A resync or a rebuild is a generator over the machine: it yields a step,
and its driver -- the agent's event loop (core.py) or the simulator
(tests/sim) -- performs it and sends the outcome back. The generator runs under
the machine's lock between two yields, so each stretch of its work is atomic
with respect to writes and reads.

Pages a Read brings are views into the driver's receive buffer: valid until
the generator yields again. Whatever it keeps it copies first (a resync's copy
of a page is bytes, not a view: a view would turn into the next reply's bytes
while the copy waits on the wire -- the bug fixed in 23bfee4).
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

Buffer = bytes | bytearray | memoryview

# Outcome of a step that reaches a store: 0 done, an errno the store refused it
# with, or UNREACHABLE (the store did not answer in time or dropped: now down).
UNREACHABLE = -1


@dataclass(frozen=True, slots=True)
class Inventory:
    """Which slots of first..first+count-1 the store holds, at which generation.
    Answer: Held, or an int outcome."""

    store: int
    first: int
    count: int


@dataclass(frozen=True, slots=True)
class Held:
    slots: array[int]
    generations: array[int]

    def as_dict(self) -> dict[int, int]:
        return dict(zip(self.slots, self.generations, strict=True))


@dataclass(frozen=True, slots=True)
class Read:
    """The pages of `slots` as the store holds them (unproven). Answer: PagesRead, or
    an int outcome."""

    store: int
    slots: list[int]
    sealed: bool


@dataclass(frozen=True, slots=True)
class PagesRead:
    """Views valid until the generator yields again: the payloads back to back in
    `data`, their `lengths` (each PAGE_SIZE for whole pages), tags, generations, seals."""

    data: memoryview
    tags: array[int]
    generations: array[int]
    seals: memoryview | None
    lengths: array[int]


@dataclass(frozen=True, slots=True)
class Write:
    """Store payloads as they are (a copy: generation, tag and seal travel with them),
    back to back in `data`, each `lengths[i]` long. Sent at once, in order with the
    store's other writes; answer: a Ticket."""

    store: int
    slots: list[int]
    data: bytes
    tags: array[int]
    generations: array[int]
    seals: bytes | None
    lengths: array[int]


@dataclass(frozen=True, slots=True)
class Discard:
    """Drop what the store holds of these ranges (a copy left where a slab moved
    from). Sent at once; answer: a Ticket."""

    store: int
    ranges: tuple[tuple[int, int], ...]


@dataclass(eq=False, slots=True)
class Ticket:
    """A step under way; `outcome` is None until it is answered."""

    outcome: int | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    """Resume once every ticket is answered. Answer: their outcomes, in order."""

    tickets: tuple[Ticket, ...]


@dataclass(frozen=True, slots=True)
class Pause:
    """Resume after `seconds` (the driver's clock). Answer: None."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Gather:
    """Several Inventory steps at once. Answer: their answers, in order."""

    steps: tuple[Inventory, ...]


Step = Inventory | Read | Write | Discard | Wait | Pause | Gather
