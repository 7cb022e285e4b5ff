"""Operations handed from nbdkit's threads to the agent's event loop.

An op is created by the nbdkit thread, completed by the loop thread, and
waited on with a threading.Event. The loop never touches nbdkit's `buf`: a
write's pages sit in reserve buffers, a read's land in the op's own `out`
buffer and the nbdkit thread copies them into `buf` itself.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable


class Completion:
    """A one-shot event on a bare lock: set() and wait() are single C calls.

    threading.Event is a Condition in Python code; on the swap path, with up to
    16 nbdkit threads and the agent's loop sharing one GIL, that extra bytecode
    per request shows in the latency.
    """

    __slots__ = ("_lock", "_set")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._set = False

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


class WriteOp:
    """`count` consecutive slots from `first`, pages in reserve buffers `bufs`.

    `on_done`, when set, runs on the agent's loop once the op is complete: a
    write-back op has no nbdkit thread waiting for it, so that is where its
    reserve buffers go back.
    """

    __slots__ = (
        "acks",
        "bufs",
        "count",
        "direct",
        "done",
        "error",
        "first",
        "generations",
        "on_done",
        "remaining",
        "tags",
    )

    def __init__(
        self, first: int, count: int, bufs: list[int], tags: tuple[int, ...], generations: bytes
    ) -> None:
        self.first = first
        self.count = count
        self.bufs = bufs
        self.tags = tags  # each page's tag: CRC32 bound to (area, slot, generation)
        self.generations = generations
        self.acks = [0] * count
        self.direct = False  # sent by its own thread (directwrite.py), not the loop
        self.remaining = 0
        self.error = 0
        self.done = Completion()
        self.on_done: Callable[[WriteOp], None] | None = None

    def finish(self, quorum: int) -> None:
        """Every replica answered: the op succeeded if each page has `quorum` acks."""
        if not self.error and min(self.acks) < quorum:
            self.error = errno.EIO
        self.complete()

    def complete(self, error: int = 0) -> None:
        self.error = self.error or error
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)


class ReadOp:
    """Pages for slots `slots`, gathered into `out` in that order; each must be its
    slot's at `generations` (the last write before the read was asked for)."""

    __slots__ = ("done", "error", "generations", "out", "remaining", "slots")

    def __init__(self, slots: list[int], generations: bytes, out: bytearray) -> None:
        self.slots = slots
        self.generations = generations
        self.out = out
        self.remaining = len(slots)
        self.error = 0
        self.done = Completion()


class ReadEntry:
    """One page of a ReadOp on its way to one replica; `tried` is a store bitmask."""

    __slots__ = ("generation", "index", "op", "slot", "tried")

    def __init__(self, op: ReadOp, index: int) -> None:
        self.op = op
        self.index = index
        self.slot = op.slots[index]
        self.generation = op.generations[index]
        self.tried = 0


class CallOp:
    """A control request (discard, flush) run as one coroutine on the loop."""

    __slots__ = ("done", "error", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self.error = 0
        self.done = Completion()
