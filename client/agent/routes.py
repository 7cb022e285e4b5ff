"""The agent's loop between nbdkit's threads and the stores: writes and reads routed as the
machine says, the batches' answers handed back to it, and the control requests.

Mixed into core.Agent. A write goes to the replicas the machine names, after the
record is settled (a slab placed, a replica marked: recorded before the pages
go); a read to the replica it names, waiting (parked) or failing when it says
so. A batch's answer goes to the machine, run by run; a read whose store was
unreachable, not refused, may ask that store again once it is back.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable

from netswap.protocol import MAX_DISCARD_RANGES
from netswap.server.ops.pressure import Pressure
from netswap.server.ops.recorder import Recorder

from ..rpc import StoreClient
from .batches import Batches, WriteRun
from .jobs import ReadEntry, ReadJob, WriteJob
from .machine.machine import FAILED, Replicas
from .policy import BatchPolicy, Decision
from .reserve import Reserve
from .seal import Sealer
from .stores import Store

log = logging.getLogger("netswap.agent")


class Routes:
    """The loop's routing and the batches' listener (core.Agent)."""

    machine: Replicas
    stores: list[Store]
    batches: list[Batches]
    reserve: Reserve
    policy: BatchPolicy
    pressure: Pressure
    sealer: Sealer | None
    area: str
    counters: Counter[str]
    decisions: Counter[str]
    recent_decisions: deque[tuple[float, str, int]]
    rpc_latency: dict[str, Recorder]
    batch_sizes: dict[str, Recorder]
    _decision: tuple[int, Pressure, Decision] | None
    on_read_done: Callable[[ReadEntry, int], None]

    def settle(self) -> None: ...
    def clock(self) -> float:
        raise NotImplementedError  # core.Agent's

    # -- writes and reads, on the loop ---------------------------------------------------
    def route_write(self, job: WriteJob) -> None:
        m = self.machine
        with m.lock:
            m.now = self.clock()
            sends = m.route_write(job)
        self.settle()  # a slab placed, a replica marked: recorded before the pages go
        kicked: set[Batches] = set()
        for store, start, count in sends:
            self.batches[store].add_write(job, start, count)
            kicked.add(self.batches[store])
        for batch in kicked:
            batch.kick()

    def route_reads(self, job: ReadJob) -> None:
        now = self.clock()
        self.counters["swap_in_pages"] += len(job.slots)
        for index in range(len(job.slots)):
            self._route_read(ReadEntry(job, index, now))
        self._kick_reads()

    def _route_read(self, entry: ReadEntry) -> None:
        m = self.machine
        with m.lock:
            m.now = self.clock()
            target = m.route_read(entry)
        if target >= 0:
            self.batches[target].add_read(entry)
        elif target == FAILED:
            self.on_read_done(entry, errno.EIO)

    def _kick_reads(self) -> None:
        for batch in self.batches:
            if batch.reads:
                batch.kick()

    def reroute(self) -> None:
        """What waited for a store goes again."""
        m = self.machine
        with m.lock:
            writes, reads = m.take_parked()
        for job in writes:
            self.route_write(job)
        for entry in reads:
            self._route_read(entry)
        self._kick_reads()

    # -- what batches need (batches.BatchListener) ------------------------------------
    def decide(self) -> Decision:
        """The policy's decision, recomputed only when its inputs change band."""
        occupancy = self.reserve.occupancy
        band = int(occupancy * 20)  # 5 % steps: finer than any policy threshold
        cached = self._decision
        if cached is None or cached[0] != band or cached[1] is not self.pressure:
            cached = self._decision = (band, self.pressure,
                                       self.policy.decide(occupancy, self.pressure))  # fmt: skip
        return cached[2]

    def generations_now(self, slots: array[int]) -> array[int]:
        """The slots' generations now (a read that raced a write may find the newer)."""
        gens = self.machine.slots.gens
        return array("Q", [gens[s] for s in slots])

    def count_decision(self, reason: str, queued: int) -> None:
        self.decisions[reason] += 1
        self.recent_decisions.append((time.monotonic(), reason, queued))

    def observe_batch(self, direction: str, pages: int, seconds: float) -> None:
        op = "swap_out" if direction == "out" else "swap_in"
        self.rpc_latency[op].observe(seconds)
        self.batch_sizes[op].observe(pages)

    def writes_done(self, store: Store, batch: list[WriteRun], error: int) -> None:
        m = self.machine
        with m.lock:
            m.now = self.clock()
            for job, start, count in batch:
                m.write_answered(store.index, job, start, count, error)
        self.settle()

    def reads_failed(self, store: Store, batch: list[ReadEntry], error: int) -> None:
        self.counters["read_fallbacks"] += len(batch)
        for entry in batch:
            if error < 0:  # unreachable, not an answer: it may be asked again once back
                entry.tried &= ~(1 << store.index)
            self._route_read(entry)
        self._kick_reads()

    def read_page_done(self, entry: ReadEntry, error: int) -> None:
        self.on_read_done(entry, error)

    def count_unopened(self, slot: int) -> None:
        """A page that proved its tag but does not open: tampered with, or the key gone."""
        self.counters["seal_failures"] += 1
        if self.sealer is not None and self.sealer.usable:
            log.error("slot %d: its page does not open under the area's key: EIO", slot)

    # -- control: discard, flush ------------------------------------------------
    async def send_discards(self, sends: list[tuple[int, list[tuple[int, int]]]]) -> int:
        await asyncio.gather(*(self._discard_on(store, ranges) for store, ranges in sends))
        return 0  # discard is advisory: the slots already read as zeros

    async def _discard_on(self, index: int, ranges: list[tuple[int, int]]) -> None:
        async def rpc(client: StoreClient) -> None:
            for at in range(0, len(ranges), MAX_DISCARD_RANGES):
                await client.discard(ranges[at : at + MAX_DISCARD_RANGES])

        await self.stores[index].call(rpc)

    async def flush(self) -> int:
        up = [store for store in self.stores if store.up]
        if not up:
            return errno.EIO
        results = await asyncio.gather(*(store.call(lambda c: c.flush()) for store in up))
        failures = [r for r in results if r > 0]
        return failures[0] if failures else (0 if any(r == 0 for r in results) else errno.EIO)
