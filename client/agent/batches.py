"""Per-store batching on the agent's loop: what waits to go to one store, and when it goes.

Writes and reads routed to a store queue here and go out as one SwapOut / one
SwapIn when the batch is full, when the store has nothing in flight (no
reason to wait), when the linger timer fires, or at once when the policy says
pressure is high. At most MAX_INFLIGHT batches per store are on the wire. A
batch's pages go from the reserve's buffers to the socket without a copy
(writelines over the reserve's views). Answers go back to the routing: every
run of a SwapOut, and every page of a SwapIn, proven (protocol/proof.py) before
it is copied into the job that asked for it.
"""

from __future__ import annotations

import asyncio
import errno
import time
from array import array
from typing import Protocol

from netswap.protocol import MAX_BATCH_PAGES, PAGE_SIZE, SEAL_SIZE, Pages, StoreError, prove_pages
from netswap.protocol.runs import runs_of

from .jobs import ReadEntry, WriteJob
from .payload import lengths_of, reveal, split
from .policy import Decision
from .reserve import Reserve
from .seal import Sealer
from .stores import Store

# Batches of one store on the wire at once: enough to keep a store busy while the
# next one forms (1-8 measured the same here), and the bound on the frames a store
# holds for us (4 x 1 MiB).
MAX_INFLIGHT = 4
WriteRun = tuple[WriteJob, int, int]  # (job, index of its first page, pages): consecutive slots


class BatchListener(Protocol):
    """What a store's batches need from the agent, and tell it (routing.Routing)."""

    area_seed: int
    reserve: Reserve
    sealer: Sealer | None  # the area's pages are encrypted (seal.py)

    def decide(self) -> Decision: ...
    def generations_now(self, slots: array[int]) -> array[int]: ...
    def count_decision(self, reason: str, queued: int) -> None: ...
    def observe_batch(self, direction: str, pages: int, seconds: float) -> None: ...
    def writes_done(self, store: Store, batch: list[WriteRun], error: int) -> None: ...
    def reads_failed(self, store: Store, batch: list[ReadEntry], error: int) -> None: ...
    def read_page_done(self, entry: ReadEntry, error: int) -> None: ...
    def count_unopened(self, slot: int) -> None: ...


class Batches:
    def __init__(self, store: Store, listener: BatchListener) -> None:
        self.store = store
        self.listener = listener
        self.inflight = 0
        self.writes: list[WriteRun] = []
        self.write_pages = 0
        self.write_slots: set[int] = set()
        self.reads: list[ReadEntry] = []
        self._timer: asyncio.TimerHandle | None = None

    def add_write(self, job: WriteJob, start: int, count: int) -> None:
        slots = range(job.first + start, job.first + start + count)
        while not self.write_slots.isdisjoint(slots):  # a slot twice in a batch: send now
            self._send_writes(MAX_BATCH_PAGES)
        self.writes.append((job, start, count))
        self.write_pages += count
        self.write_slots.update(slots)

    def add_read(self, entry: ReadEntry) -> None:
        self.reads.append(entry)

    def kick(self) -> None:
        """Send what is queued now, or arm the linger timer, as the policy says."""
        decision = self.listener.decide()
        if self.inflight >= MAX_INFLIGHT:
            return  # a completing batch kicks again
        full = self.write_pages >= decision.max_pages or len(self.reads) >= decision.max_pages
        if full or self.inflight == 0 or decision.send_now:
            self._send(decision.max_pages, decision.reason)
        elif self._timer is None and (self.writes or self.reads):
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(decision.linger_s, self._linger_expired)

    def _linger_expired(self) -> None:
        self._timer = None
        self._send(self.listener.decide().max_pages, "linger")

    def _send(self, max_pages: int, reason: str) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while (self.writes or self.reads) and self.inflight < MAX_INFLIGHT:
            queued = self.write_pages + len(self.reads)
            if self.writes:
                self._send_writes(max_pages)
            if self.reads and self.inflight < MAX_INFLIGHT:
                self._send_reads(max_pages)
            self.listener.count_decision(reason, queued - self.write_pages - len(self.reads))

    def _send_writes(self, max_pages: int) -> None:
        batch: list[WriteRun] = []
        room, writes, taken = max_pages, self.writes, 0
        for job, start, count in writes:
            if count > room:  # split the run: its tail waits for the next batch
                batch.append((job, start, room))
                writes[taken] = (job, start + room, count - room)
                room = 0
                break
            batch.append((job, start, count))
            room -= count
            taken += 1
            if not room:
                break
        del writes[:taken]
        self.write_pages -= max_pages - room
        if not writes:
            self.write_slots.clear()
        else:
            for job, start, count in batch:
                self.write_slots.difference_update(range(job.first + start,
                                                         job.first + start + count))  # fmt: skip
        if batch:
            self._swap_out(batch, max_pages - room)

    def _send_reads(self, max_pages: int) -> None:
        batch, self.reads = self.reads[:max_pages], self.reads[max_pages:]
        if batch:
            self._swap_in(batch)

    def _swap_out(self, batch: list[WriteRun], pages: int) -> None:
        client, listener = self.store.client, self.listener
        if client is None:
            listener.writes_done(self.store, batch, -1)
            return
        views = listener.reserve.views
        if len(batch) == 1:  # one run: its arrays are slices
            job, start, count = batch[0]
            end = start + count
            runs: tuple[range, ...] = (range(job.first + start, job.first + end),)
            tags, gens = job.tags[start:end], job.generations[start:end]
            data = _payloads(views, job, start, end)
            seals = job.seals[start * SEAL_SIZE : end * SEAL_SIZE] if job.seals else None
        else:
            spans: list[range] = []
            tags, gens, data = array("I"), array("Q"), []
            seals = bytearray() if listener.sealer is not None else None
            for job, start, count in batch:
                end = start + count
                first = job.first + start
                if spans and spans[-1].stop == first:  # the next job goes on where this ends
                    spans[-1] = range(spans[-1].start, first + count)
                else:
                    spans.append(range(first, first + count))
                tags.extend(job.tags[start:end])
                gens.extend(job.generations[start:end])
                data.extend(_payloads(views, job, start, end))
                if seals is not None and job.seals is not None:
                    seals += job.seals[start * SEAL_SIZE : end * SEAL_SIZE]
            runs = tuple(spans)
        began = time.perf_counter()

        def done(failure: Exception | None) -> None:
            error = self._outcome(client, failure)
            if error == 0:
                listener.observe_batch("out", pages, time.perf_counter() - began)
            listener.writes_done(self.store, batch, error)
            self._batch_done()

        self.inflight += 1
        client.start_swap_out(runs, data, tags, gens, seals, done)  # the views, not a copy

    def _swap_in(self, batch: list[ReadEntry]) -> None:
        client, listener = self.store.client, self.listener
        if client is None:
            listener.reads_failed(self.store, batch, -1)
            return
        began = time.perf_counter()
        slots = array("Q", [e.slot for e in batch])
        runs = runs_of(slots)
        expected = array("Q", [e.gen for e in batch])

        def done(reply: Pages | None, failure: Exception | None) -> None:
            if failure is None:
                assert isinstance(reply, Pages)
                failure = prove_pages(listener.area_seed, reply.data, reply.tags,
                                      reply.generations, slots, expected,
                                      lambda: listener.generations_now(slots),
                                      lengths_of(reply, len(slots)))  # fmt: skip
            error = self._outcome(client, failure)
            if error:
                listener.reads_failed(self.store, batch, error)
            else:
                assert isinstance(reply, Pages)
                listener.observe_batch("in", len(batch), time.perf_counter() - began)
                self._deliver(reply, batch, slots)
            self._batch_done()

        self.inflight += 1
        client.start_swap_in(runs, listener.sealer is not None, done)

    def _deliver(self, reply: Pages, batch: list[ReadEntry], slots: array[int]) -> None:
        """Each page to its job's buffer, opened where the area is sealed and decoded
        (payload.py): one that does not open or decode (tampered, or the key gone) is
        that slot's EIO alone."""
        listener, sealer = self.listener, self.listener.sealer
        payloads = split(memoryview(reply.data), lengths_of(reply, len(batch)))
        seals = memoryview(reply.seals) if reply.seals is not None else None
        for i, entry in enumerate(batch):
            at = entry.index * PAGE_SIZE
            out = memoryview(entry.job.out)[at : at + PAGE_SIZE]
            seal = seals[i * SEAL_SIZE : (i + 1) * SEAL_SIZE] if seals is not None else None
            if not reveal(payloads[i], out, sealer, seal, slots[i], reply.generations[i]):
                listener.count_unopened(slots[i])
                listener.read_page_done(entry, errno.EIO)
                continue
            listener.read_page_done(entry, 0)

    def _outcome(self, client: object, failure: Exception | None) -> int:
        """0 ok, the store's errno, or -1 when the store is unreachable (now marked down)."""
        if failure is None:
            return 0
        if isinstance(failure, StoreError):
            return failure.errno
        if self.store.client is client:  # not a stale failure of a client already replaced
            self.store.mark_down(failure)
        return -1

    def _batch_done(self) -> None:
        self.inflight -= 1
        if self.writes or self.reads:
            self.kick()


def _payloads(views: list[memoryview], job: WriteJob, start: int, end: int) -> list[memoryview]:
    """Pages start..end-1 of a job as the payloads in their reserve buffers (no copy)."""
    lengths = job.lengths
    if not lengths:
        return [views[b] for b in job.bufs[start:end]]
    return [views[b] if lengths[start + i] == PAGE_SIZE else views[b][: lengths[start + i]]
            for i, b in enumerate(job.bufs[start:end])]  # fmt: skip


def payloads_of(views: list[memoryview], job: WriteJob) -> list[memoryview]:
    return _payloads(views, job, 0, job.count)
