"""A request that is alone goes to its stores from nbdkit's own thread, not through the loop.

A faulting process waits for one 4 KiB read at QD1, and handing that read to
the agent's loop thread and back cost about a third of its latency; a lone
write-through write likewise. So a lone read goes straight to one in-sync
replica, and a lone write to every replica of its slab, over blocking clients
the thread takes from each Store's pool (stores.py) -- the GIL is free while
the socket waits. Reads are proven as on the loop's path (protocol/proof.py),
and their pages copied straight from the client's buffer into the caller's.
A write's pages go from the reserve's views (sendmsg, no copy): all sends
first, then all answers, so the waits overlap.

Anything out of the ordinary -- no idle client, a deadline passed, a refusal,
a page not proven, a read or write across slabs, a slab not placed, a replica
not in sync, a resync under way -- hands the request to the loop, which owns
failover, fallbacks and repair (a write sent again is the same write: same
slots, generations and tags). A missed deadline also marks the store down, as
the loop's own path does. A write's choice of replicas and its entry in the
slab's writes in flight are made under routing.Routing's lock, the lock
under which a resync begins: either the resync sees the write and waits for
it, or the write sees the resync and goes through the loop.
"""

from __future__ import annotations

import ssl
import threading
import time
from array import array
from collections.abc import Callable

from netswap.protocol import (
    PAGE_SIZE,
    SEAL_SIZE,
    Ok,
    Pages,
    RemoteProtocolError,
    StoreError,
    SwapIn,
    prove_pages,
)
from netswap.server.ops.recorder import BATCH_BUCKETS, LATENCY_BUCKETS, Recorder

from ..rpc import BlockingClient
from .batches import payloads_of
from .core import Agent
from .jobs import WriteJob
from .payload import lengths_of, reveal, split
from .stores import Store

# What a call on the thread path can meet on its way; each hands the request to the loop.
DIRECT_ERRORS = (OSError, ssl.SSLError, StoreError, RemoteProtocolError, TimeoutError)


class PathFigures:
    """Requests, fallbacks, pages, round trips and batch sizes of one direction; the
    stats merge them with the loop's (written under `lock`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = self.fallbacks = self.pages = 0
        self.latency = Recorder(LATENCY_BUCKETS)
        self.batches = Recorder(BATCH_BUCKETS)

    def served(self, pages: int, seconds: float) -> None:
        with self.lock:
            self.requests += 1
            self.pages += pages
            self.latency.observe(seconds)
            self.batches.observe(pages)

    def fell_back(self) -> bool:
        with self.lock:
            self.fallbacks += 1
        return False


class DirectPath:
    """Lone reads (`reads`) and lone write-through writes (`writes`) on the calling
    thread; each method returns False when the loop must do it instead."""

    def __init__(self, agent: Agent, reads: bool, writes: bool) -> None:
        self.agent = agent
        self.reads, self.writes = reads, writes
        self.read_figures = PathFigures()
        self.write_figures = PathFigures()

    # -- a lone read -------------------------------------------------------------
    def read(
        self,
        slots: range,
        expected: array[int],
        current: Callable[[], array[int]],
        out: memoryview,
    ) -> bool:
        """Read `slots` from one in-sync replica into out (their payloads are views into
        the client's buffer: opened and decoded into out before it is given back)."""
        agent, machine, figures = self.agent, self.agent.machine, self.read_figures
        with machine.lock:
            index = machine.direct_read_store(slots.start, len(slots))
        if index < 0 or not agent.stores[index].up:
            return figures.fell_back()
        store = agent.stores[index]
        client = self._take(store)
        if client is None:
            return figures.fell_back()
        began = time.perf_counter()
        sealer = agent.sealer
        try:
            request = SwapIn(client.next_id(), (slots,), sealer is not None)
            reply = client.call(request, agent.io_timeout)
        except DIRECT_ERRORS:
            store.lost(client)
            return figures.fell_back()
        if not isinstance(reply, Pages):
            store.give(client)
            return figures.fell_back()  # a refusal: the loop decides
        lengths = lengths_of(reply, len(slots))
        if prove_pages(agent.area_seed, reply.data, reply.tags, reply.generations, slots,
                       expected, current, lengths) is not None:  # fmt: skip
            store.give(client)
            return figures.fell_back()  # an unproven page: the loop decides
        try:
            seals = memoryview(reply.seals) if reply.seals is not None else None
            for i, payload in enumerate(split(memoryview(reply.data), lengths)):
                seal = seals[i * SEAL_SIZE : (i + 1) * SEAL_SIZE] if seals is not None else None
                page = out[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
                if not reveal(payload, page, sealer, seal, slots[i], reply.generations[i]):
                    return figures.fell_back()  # the loop's read says EIO, for that slot
        finally:
            store.give(client)
        figures.served(len(slots), time.perf_counter() - began)
        return True

    @staticmethod
    def _take(store: Store) -> BlockingClient | None:
        try:
            return store.take()
        except DIRECT_ERRORS:
            return None

    # -- a lone write ------------------------------------------------------------
    def write(self, job: WriteJob) -> bool:
        """True: every replica stored the job's pages and the job is complete (the
        machine's rule, met on this thread: every replica answered, all took it)."""
        agent, machine = self.agent, self.agent.machine
        with machine.lock:
            indexes = machine.direct_write_stores(job)
        if indexes is None:
            return self.write_figures.fell_back()
        began = time.perf_counter()
        if not self._send(job, [agent.stores[s] for s in indexes]):
            return self.write_figures.fell_back()  # the loop sends it again: the same write
        with machine.lock:
            machine.direct_write_done(job)
        agent.settle()  # a resync waiting for this job may start
        self.write_figures.served(job.count, time.perf_counter() - began)
        return True

    def _send(self, job: WriteJob, stores: list[Store]) -> bool:
        """Send to every store, then read every answer; False on any trouble."""
        taken: list[tuple[Store, BlockingClient]] = []
        for store in stores:
            client = self._take(store)
            if client is None:
                break
            taken.append((store, client))
        if len(taken) != len(stores) or not taken:  # a store's clients all busy or refused
            for store, client in taken:
                store.give(client)
            return False
        views = self.agent.reserve.views
        pages = payloads_of(views, job)
        runs = (range(job.first, job.first + job.count),)
        timeout = self.agent.io_timeout
        end = time.monotonic() + timeout
        sent: list[tuple[Store, BlockingClient]] = []
        for store, client in taken:
            try:
                frame = client.conn.send_swap_out(client.next_id(), runs, job.generations,
                                                  job.tags, job.seals, pages)  # fmt: skip
                client.send(frame, timeout)
            except DIRECT_ERRORS:
                store.lost(client)
                continue
            sent.append((store, client))
        ok = len(sent) == len(taken)
        for store, client in sent:
            try:
                reply = client.reply(end)
            except TimeoutError as exc:  # the loop's rule: a missed deadline is down
                store.lost(client)
                self.agent.submit(store.mark_down, exc)
                ok = False
                continue
            except DIRECT_ERRORS:
                store.lost(client)
                ok = False
                continue
            store.give(client)
            ok = ok and isinstance(reply, Ok)  # a refusal: the loop's path reports it
        return ok
