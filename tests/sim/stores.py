"""Simulated page stores: what a memory store, a file store and a Redis master keep, and lose.

Each answers the requests the agent's shell sends (Hello, Fence, SwapOut,
SwapIn, Inventory, Discard, Flush) with the real store's rules: a session binds
an area and fences with its agent's epoch; a session below the area's floor
changes nothing (ESTALE); a page whose generation is not above the one held is
skipped (a late frame never rolls a slot back); reads return the page with its
generation, tag and seal, unproven. Faults are the nemesis's knobs:

- stall: requests wait at the store (a SIGSTOP, a GC pause) and are served
  in order when it resumes -- frames of connections the agent gave up on
  included;
- crash: the process dies; a memory store comes back empty, a file store at
  its last flush (its index), a Redis master is replaced by its replica, which
  has what replication had carried (asynchronously) when the master died;
- refuse: writes are refused with an errno for a while (a full store).
A store's `boot` changes at every restart; a file store's `clean` says its last
life ended with everything flushed.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .world import World

Page = tuple[int, int, bytes, bytes | None]  # generation, tag, data, seal
# How far behind a Redis replica runs: replication is asynchronous; these are the
# simulated seconds a write takes to reach the replica.
REPLICATION_LAG = (0.001, 0.3)


@dataclass
class AreaState:
    area_id: int = 0
    holder: str = ""
    floor: int = 0
    slots: int = 0
    pages: dict[int, Page] = field(default_factory=dict)

    def copy(self) -> AreaState:
        return AreaState(self.area_id, self.holder, self.floor, self.slots, dict(self.pages))


class SimStore:
    def __init__(self, world: World, index: int, kind: str) -> None:
        self.world, self.index, self.kind = world, index, kind
        self.name = f"{kind}{index}"
        self.store_id = world.rng.getrandbits(63) | 1
        self.boot = world.rng.getrandbits(63) | 1
        self.prev_boot = 0
        self.clean = False
        self.area: AreaState | None = None
        self.durable: AreaState | None = None  # file: the last flush
        self.replica: AreaState | None = None  # redis: what its replica has
        self.alive = True
        self.stalled = False
        self.queue: list[tuple[Any, Callable[[Any], None]]] = []
        self.refuse_until = 0.0
        self.refuse_errno = errno.ENOSPC
        self.applied: list[tuple[int, int, int]] = []  # (slot, generation, session epoch)
        self.connections: list[Any] = []  # links to this process (reset when it dies)

    # -- faults ------------------------------------------------------------------------
    def stall(self) -> None:
        self.stalled = True

    def resume(self) -> None:
        self.stalled = False
        queue, self.queue = self.queue, []
        for request, reply in queue:
            if self.alive:
                self._serve(request, reply)

    def crash(self) -> None:
        """kill -9 (or a master's death): in-flight requests die with it, and its kernel
        closes every connection (the agent hears it at once)."""
        self.alive = False
        self.stalled = False
        self.queue = []
        self._reset_connections()

    def _reset_connections(self) -> None:
        connections, self.connections = self.connections, []
        for link in connections:
            self.world.after(self.world.latency(), link.reset)

    def restart(self) -> None:
        self.prev_boot, self.boot = self.boot, self.world.rng.getrandbits(63) | 1
        self.clean = False
        if self.kind == "memory":
            self.area = None
        elif self.kind == "file":
            self.area = self.durable.copy() if self.durable is not None else None
        else:  # redis: the replica is promoted with what replication carried
            self.area = self.replica.copy() if self.replica is not None else None
        self.alive = True

    # -- requests ----------------------------------------------------------------------
    def receive(self, request: Any, reply: Callable[[Any], None]) -> None:
        if not self.alive:
            return
        if self.stalled:
            self.queue.append((request, reply))
            return
        self._serve(request, reply)

    def _serve(self, request: Any, reply: Callable[[Any], None]) -> None:
        kind = request[0]
        handler = getattr(self, f"_on_{kind}")
        reply(handler(*request[1:]))

    def _on_hello(self, session: Session) -> Any:
        self.connections.append(session.link)
        area = self.area
        return ("welcome", self.store_id, self.boot, self.prev_boot, self.clean,
                area.area_id if area else 0, area.slots if area else 0,
                area.floor if area else 0)  # fmt: skip

    def _on_swapfile(self, session: Session, area_id: int, slots: int, fresh: bool) -> Any:
        area = self.area
        if area is not None and area.floor > session.epoch:
            return errno.ESTALE
        if area is None or (fresh and area.area_id != area_id):
            self.area = AreaState(area_id, "host", 0, slots)
            self._replicate(lambda a: None, reset=True)
        return 0

    def _on_fence(self, session: Session, epoch: int) -> Any:
        area = self.area
        if area is None:
            return errno.ENXIO
        if epoch < area.floor:
            return errno.ESTALE
        area.floor = epoch
        session.epoch = epoch
        if self.kind == "file" and self.durable is not None:  # fsynced before the answer
            self.durable.floor = max(self.durable.floor, epoch)
        self._replicate(lambda a: setattr(a, "floor", max(a.floor, epoch)))
        return 0

    def _on_write(self, session: Session, slots: list[int], pages: list[Page]) -> Any:
        area = self.area
        if area is None:
            return errno.ENXIO
        if session.epoch < area.floor:
            return errno.ESTALE
        if self.world.now < self.refuse_until:
            return self.refuse_errno
        for slot, page in zip(slots, pages, strict=True):
            held = area.pages.get(slot)
            if held is not None and held[0] >= page[0]:
                continue  # newer-only: a late frame never rolls a slot back
            area.pages[slot] = page
            self.applied.append((slot, page[0], session.epoch))
            self._replicate(lambda a, s=slot, p=page: _newer(a, s, p))
        return 0

    def _on_read(self, session: Session, slots: list[int]) -> Any:
        area = self.area
        if area is None:
            return errno.ENXIO
        return [area.pages.get(slot) for slot in slots]

    def _on_inventory(self, session: Session, first: int, count: int) -> Any:
        area = self.area
        if area is None:
            return errno.ENXIO
        return {s: p[0] for s, p in area.pages.items() if first <= s < first + count}

    def _on_discard(self, session: Session, ranges: list[tuple[int, int]]) -> Any:
        area = self.area
        if area is None:
            return errno.ENXIO
        if session.epoch < area.floor:
            return errno.ESTALE
        for first, count in ranges:
            for slot in range(first, first + count):
                area.pages.pop(slot, None)
        self._replicate(lambda a: [a.pages.pop(s, None) for f, c in ranges
                                   for s in range(f, f + c)])  # fmt: skip
        return 0

    def _on_flush(self, session: Session) -> Any:
        if self.kind == "file" and self.area is not None:
            self.durable = self.area.copy()
        return 0

    def _replicate(self, change: Callable[[AreaState], Any], reset: bool = False) -> None:
        """Redis: the change reaches the replica later (asynchronous replication)."""
        if self.kind != "redis":
            return
        if reset:
            area = self.area
            self.replica = area.copy() if area is not None else None
            return
        boot = self.boot

        def apply() -> None:
            if self.boot == boot and self.replica is not None:
                change(self.replica)

        self.world.after(self.world.rng.uniform(*REPLICATION_LAG), apply)

    def shutdown_clean(self) -> None:
        """SIGTERM: flush, mark the life clean, exit (then restart())."""
        if self.kind == "file" and self.area is not None:
            self.durable = self.area.copy()
        self.alive = False
        self.queue = []
        self._reset_connections()

    def restart_clean(self) -> None:
        self.restart()
        self.clean = self.kind == "file"


def _newer(area: AreaState, slot: int, page: Page) -> None:
    held = area.pages.get(slot)
    if held is None or held[0] < page[0]:
        area.pages[slot] = page


class Session:
    """One connection's binding at a store: its agent's fenced epoch."""

    __slots__ = ("epoch", "link")

    def __init__(self, link: Any) -> None:
        self.epoch = 0
        self.link = link
