"""An in-process page store and StoreClient for unit tests of the agent core.

In the manner of uvicorn's MockTransport: the agent runs unchanged (its loop,
links, batching, replicas, repair) but `connect_store` hands it a FakeClient
over a FakeStore's dict instead of a socket to a store process. Tags are the
real ones (protocol.tags_of), so the agent's end-to-end check still runs.
Each fault a test needs is one knob on the store: refuse connections, drop
every connection (kill -9), hold replies (a frozen store), refuse writes.
"""

from __future__ import annotations

import asyncio
import errno
import random
import ssl
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

from netswap.client.rpc import ConnectionLost, StoreClient
from netswap.protocol import PAGE_SIZE, Pages, StoreError, area_seed, page_tag
from netswap.protocol.messages import Buffer

ZERO = bytes(PAGE_SIZE)


@dataclass
class FakeStore:
    name: str
    capacity_pages: int = 1 << 16
    pages: dict[int, tuple[bytes, int, int]] = field(default_factory=dict)  # slot: data,tag,gen
    refuse: bool = False  # connections fail (the store is down)
    frozen: bool = False  # requests are taken but not answered until thawed
    write_error: int = 0  # every SwapOut fails with this errno
    clients: list[FakeClient] = field(default_factory=list)
    held: list[Callable[[], None]] = field(default_factory=list)
    swap_outs: int = 0
    area_id: int = 0  # the area's life it holds (0: none)
    floor: int = 0  # the highest epoch fenced
    boot: int = field(default_factory=lambda: random.getrandbits(63) | 1)
    store_id: int = field(default_factory=lambda: random.getrandbits(63) | 1)

    async def connect(self, host: str, port: int, area: str, token: str, deadline: float,
                      tls: ssl.SSLContext | None) -> StoreClient:  # fmt: skip
        await asyncio.sleep(0)
        if self.refuse:
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"{self.name} refuses")
        client = FakeClient(self, area)
        self.clients.append(client)
        return cast(StoreClient, client)

    def kill(self) -> None:
        """kill -9: every connection drops, every page is gone, new ones are refused."""
        self.refuse = True
        self.pages.clear()
        self.area_id, self.floor = 0, 0
        self.boot = random.getrandbits(63) | 1  # a memory store's next life
        for client in self.clients:
            client.drop(ConnectionLost(f"{self.name} died"))
        self.clients.clear()
        held, self.held = self.held, []
        for reply in held:  # requests on the wire fail with the connection, as in rpc.py
            reply()

    def thaw(self) -> None:
        self.frozen = False
        held, self.held = self.held, []
        for reply in held:
            reply()


class FakeClient:
    def __init__(self, store: FakeStore, area: str) -> None:
        self.store = store
        self.area_seed = area_seed(area)
        held = 1 << 20 if store.area_id else 0
        self.welcome = SimpleNamespace(area_slots=held, capacity_pages=store.capacity_pages,
                                       store_id=store.store_id, boot=store.boot, prev_boot=0,
                                       clean=False, area_id=store.area_id, holder="",
                                       floor=store.floor)  # fmt: skip
        self.connected = True
        self.epoch = 0  # what this connection fenced with
        self._on_lost: Callable[[Exception], None] | None = None

    def on_lost(self, callback: Callable[[Exception], None]) -> None:
        self._on_lost = callback

    def drop(self, why: Exception) -> None:
        if self.connected:
            self.connected = False
            if self._on_lost is not None:
                asyncio.get_running_loop().call_soon(self._on_lost, why)

    def abort(self) -> None:
        self.connected = False

    async def close(self) -> None:
        self.connected = False

    def _reply(self, fn: Callable[[], None]) -> None:
        if self.store.frozen:
            self.store.held.append(fn)
        else:
            asyncio.get_running_loop().call_soon(fn)

    # -- the batch path -------------------------------------------------------
    def start_swap_out(
        self,
        runs: Sequence[range],
        pages: Sequence[Buffer],
        tags: Sequence[int],
        generations: Sequence[int],
        seals: Buffer | None,
        done: Callable[[Exception | None], None],
    ) -> None:
        store = self.store
        store.swap_outs += 1
        payloads = [bytes(p) for p in pages]  # copied now, as sent
        slots = [s for run in runs for s in run]
        tags, generations = list(tags), list(generations)

        def reply() -> None:
            if not self.connected:
                return done(ConnectionLost("gone"))
            if self.epoch < store.floor:  # a connection below the area's floor: a store's rule
                return done(StoreError(errno.ESTALE, "a newer agent holds the area"))
            if store.write_error:
                return done(StoreError(store.write_error, "refused by the test"))
            for i, slot in enumerate(slots):
                held = store.pages.get(slot)
                if held is not None and held[2] >= generations[i]:
                    continue  # newer-only, as a store
                store.pages[slot] = (payloads[i], tags[i], generations[i])
            done(None)

        self._reply(reply)

    def start_swap_in(self, runs: Sequence[range], sealed: bool,
                      done: Callable[[Pages | None, Exception | None], None]) -> None:  # fmt: skip
        slots = [s for run in runs for s in run]

        def reply() -> None:
            if not self.connected:
                return done(None, ConnectionLost("gone"))
            done(self._pages(slots), None)

        self._reply(reply)

    def _pages(self, slots: Sequence[int]) -> Pages:
        """The pages as a store answers: its bytes, tags and generations (a slot never
        written: zeros at generation 0); the agent proves them itself."""
        seed = self.area_seed
        held = [self.store.pages.get(s) or (ZERO, page_tag(ZERO, seed, s, 0), 0) for s in slots]
        lengths = array("H", [len(h[0]) for h in held])
        sized = None if all(n == PAGE_SIZE for n in lengths) else lengths
        return Pages(0, b"".join(h[0] for h in held), array("I", [h[1] for h in held]),
                     array("Q", [h[2] for h in held]), None, sized)  # fmt: skip

    async def read_pages(self, slots: Sequence[int], sealed: bool = False) -> Pages:
        return self._pages(slots)

    # -- control --------------------------------------------------------------
    async def swapfile(self, activate: bool, slots: int, area_id: int = 0, holder: str = "",
                       force: bool = False) -> None:  # fmt: skip
        store = self.store
        if not activate or (area_id and area_id != store.area_id):
            store.pages.clear()
            store.floor = 0
        store.area_id = area_id if activate else 0

    async def fence(self, epoch: int) -> None:
        if epoch < self.store.floor:
            raise StoreError(errno.ESTALE, f"a newer agent (epoch {self.store.floor})")
        self.store.floor = self.epoch = epoch

    async def inventory(self, first: int, count: int) -> tuple[array[int], array[int], array[int]]:
        held = sorted(s for s in self.store.pages if first <= s < first + count)
        pages = self.store.pages
        return (array("Q", held), array("Q", [pages[s][2] for s in held]),
                array("H", [len(pages[s][0]) for s in held]))  # fmt: skip

    async def stats(self) -> dict[str, Any]:
        return {"used_pages": len(self.store.pages)}

    async def flush(self) -> None:
        pass

    async def discard(self, ranges: Sequence[tuple[int, int]]) -> None:
        for start, count in ranges:
            for slot in range(start, start + count):
                self.store.pages.pop(slot, None)
