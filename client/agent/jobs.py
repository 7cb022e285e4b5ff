"""Jobs: the work nbdkit's threads hand to the agent's event loop.

A job is created by the nbdkit thread, completed by the loop thread (or, for
a lone write, by the nbdkit thread itself: direct.py), and waited on with a
Completion. The loop never touches nbdkit's `buf`: a write's pages sit in
reserve buffers, a read's land in the job's own `out` buffer and the nbdkit
thread copies them into `buf` itself.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Callable


class Completion:
    """A one-shot event on a bare lock: set() and wait() are single C calls.

    threading.Event is a Condition in Python code; on the swap path, with up to
    16 nbdkit threads and the agent's loop sharing one GIL, that extra bytecode
    per request shows in the latency.
    """

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._set = False  # plain values first (WriteJob says why)
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        if not self._set:
            self._set = True
            self._lock.release()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        if self._set:
            return True
        if self._lock.acquire(timeout=timeout):
            self._lock.release()  # let any other waiter through too
            return True
        return self._set


_NO_GENERATIONS = array("Q")
_NO_TAGS = array("I")
_WHOLE = array("H")

# acks[i] + 1 for a slice of a bytearray, in C (bytes.translate); 255 stays 255.
_PLUS_ONE = bytes(range(1, 256)) + b"\xff"


class WriteJob:
    """`count` consecutive slots from `first`, pages in reserve buffers `bufs`, with
    their tags and wire generations; `counts` are the slots' new write counts.

    `on_done`, when set, runs on the agent's loop once the job is complete: a
    write-back job has no nbdkit thread waiting for it, so that is where its
    reserve buffers go back.
    """

    __slots__ = ("acks", "bufs", "complete", "count", "direct", "done", "error", "fills",
                 "first", "generations", "lengths", "on_done", "parked_at", "refusal",
                 "remaining", "seals", "tags", "unreachable")  # fmt: skip

    def __init__(self, first: int, count: int, bufs: list[int]) -> None:
        # Plain values first: mypyc counts an attribute set after a call in __init__ as
        # possibly undefined, and its cross-module check of those crashes its build.
        self.first = first
        self.count = count
        self.direct = False  # sent by its own thread (direct.py), not the loop
        self.remaining = 0
        self.error = 0
        self.refusal = 0  # the errno a replica refused it with (the job's error if it fails)
        self.parked_at = 0.0  # when it began to wait for a replica to answer (0: not)
        self.unreachable = False  # a replica it went to did not answer (it may be back)
        self.complete = False  # the machine decided its outcome (machine._finish_write)
        self.fills: dict[int, int] | None = None  # page index -> word, of same-filled pages
        self.bufs = bufs  # each page's payload (payload.py), encrypted in place if sealed
        self.lengths = _WHOLE  # each payload's length (the device sets them)
        self.generations = _NO_GENERATIONS  # the machine gives them (machine.begin_write)
        self.tags = _NO_TAGS  # each page's tag: CRC32 bound to (area, slot, generation)
        self.seals: bytearray | None = None  # sealed: each page's GCM tag, SEAL_SIZE apiece
        self.acks = bytearray(count)  # replicas that took each page
        self.done = Completion()
        self.on_done: Callable[[WriteJob], None] | None = None

    def acked(self, start: int, count: int) -> None:
        """One more replica took pages start..start+count-1."""
        acks = self.acks
        acks[start : start + count] = acks[start : start + count].translate(_PLUS_ONE)

    def signal(self) -> None:
        """The shell tells its waiter (after the record is persisted)."""
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)


class ReadJob:
    """Pages for slots `slots`, gathered into `out` in that order; each must be its
    slot's from generation gens[i] (the last write before the read was asked)."""

    __slots__ = ("done", "error", "gens", "out", "remaining", "slots")

    def __init__(self, slots: list[int], gens: array[int], out: bytearray) -> None:
        remaining = len(slots)  # computed first: plain values first (WriteJob says why)
        self.error = 0
        self.remaining = remaining
        self.slots = slots
        self.gens = gens
        self.out = out
        self.done = Completion()


class ReadEntry:
    """One page of a ReadJob on its way to one replica; `tried` is a store bitmask of
    the replicas that answered without it."""

    __slots__ = ("gen", "index", "job", "parked", "since", "slot", "tried")

    def __init__(self, job: ReadJob, index: int, since: float) -> None:
        slot, gen = job.slots[index], job.gens[index]  # plain values first (WriteJob says why)
        self.tried = 0
        self.since = since  # when it was asked (its wait is bounded from here)
        self.parked = False  # waiting for a replica's store to answer again
        self.index = index
        self.slot = slot
        self.gen = gen
        self.job = job


class ControlJob:
    """A control request (discard, flush) run as one coroutine on the loop."""

    __slots__ = ("done", "error", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self.error = 0
        self.done = Completion()
