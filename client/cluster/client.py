"""The agent's client for a Redis-protocol cluster, in place of a netswap store.

It answers what the agent asks of a store's client (rpc.StoreClient, protocol 4):
the Welcome (who answers: a store id and a boot from lineage.py; the area's record
and floor), Swapfile with the area record and Fence (scripts.py: the store's rules,
run where the keys live), batches, Inventory, Discard and stats. A batch is cut
into chunk pieces (layout.py), one script or a few GETRANGEs per piece, sent as
one pipeline per node (router.py); a write's pipeline ends with WAIT, and what
WAIT says is recorded (watch.py) before the write is acknowledged.

Whatever the cluster does while it moves or fails over reaches the agent as a store
that does not answer (ConnectionLost, and `on_lost`): the agent's machine then waits
for it -- reads up to their bound, writes to theirs -- and the agent connects again
(a new client) until the cluster answers. A cluster that may have lost acknowledged
writes answers as a new boot. What it never does is decide a page is good: the
generations and tags it reads back go to the agent's own proof, so a page a
failover rolled back is EIO, never stale data.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from netswap.protocol import PAGE_SIZE, Pages, StoreError
from netswap.protocol.errors import ConnectionLost
from netswap.protocol.messages import Buffer
from redis import exceptions as rx
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from . import batch
from .area import Area
from .layout import (
    CHUNK_PAGES,
    buckets_of,
    chunk_keys,
    chunks_of,
    floor_key_of,
    pieces,
)
from .lineage import Durable
from .router import Cmd, Router
from .scripts import DISCARD
from .watch import NodeFigures, Watch

# How long a write's WAIT waits for its replicas before the write is acknowledged all the
# same (and its master put in doubt: watch.py): a replica on loopback or a LAN answers in
# a millisecond or two; one that is down or resyncing must not hold swap-out for seconds.
WAIT_MS = 200
# Chunks unlinked per request: bounded work per round trip.
UNLINK_BATCH = 512


@dataclass(frozen=True)
class Welcome:
    """What a store's Welcome says (protocol/messages.py), for the cluster."""

    area_slots: int
    capacity_pages: int
    store_id: int
    boot: int
    prev_boot: int
    clean: bool
    area_id: int
    holder: str
    floor: int


class ClusterClient:
    def __init__(self, cluster: RedisCluster, area: str, deadline: float, wait: int,
                 wait_ms: int, durable: Durable | None = None) -> None:  # fmt: skip
        self.cluster, self.area, self.deadline = cluster, area, deadline
        self.router = Router(cluster, deadline, wait, wait_ms)
        self.watch = Watch(cluster, area, deadline, durable)
        self.record = Area(self.router, area)
        self.router.on_wait = self.watch.on_wait
        self.router.on_topology = lambda: self.watch.check(refresh=False)
        self.router.live_replicas = lambda node: self.watch.live.get(node, 0)
        self.welcome: Welcome | None = None
        self.epoch = 0  # fenced with (0: never): every change is checked against the floors
        self.slots = 0  # the area's size as known: its buckets have floors
        self.superseded = 0  # pages a write skipped as not newer than the slot's
        self._discarding: dict[int, asyncio.Event] = {}  # chunk -> a discard under way
        self._open = True
        self._on_lost: Callable[[Exception], None] | None = None
        self._closing: asyncio.Future[Any] | None = None

    @classmethod
    async def connect(cls, seeds: Sequence[tuple[str, int]], area: str, user: str,
                      password: str, deadline: float, wait: int = 1, wait_ms: int = 0,
                      durable: Durable | None = None) -> ClusterClient:  # fmt: skip
        """Connect, and judge who answers (watch.py). `durable`: where the lineage record
        outlives this process (the agent's keyring entry; None: this process only)."""
        cluster = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in seeds],
                               username=user or None, password=password or None,
                               socket_timeout=deadline, socket_connect_timeout=deadline,
                               require_full_coverage=False,
                               retry=Retry(NoBackoff(), 1))  # fmt: skip
        client = cls(cluster, area, deadline, wait, wait_ms or WAIT_MS, durable)
        try:
            async with asyncio.timeout(deadline):
                await cluster.initialize()
                record = await client.record.read()
                state = await client.watch.begin(record.area_id)
                capacity = await client.watch.capacity_pages()
        except StoreError:
            await client.close()
            raise
        except Exception as exc:  # redis-py wraps some in RedisClusterException
            await client.close()
            text = str(exc)
            refused = ("WRONGPASS", "NOAUTH", "NOPERM", "invalid username")
            if isinstance(exc, rx.AuthenticationError | rx.NoPermissionError) or any(
                word in text for word in refused
            ):
                raise StoreError(errno.EACCES, f"the cluster refused user "
                                 f"{user or 'default'}: {text}") from None  # fmt: skip
            raise ConnectionLost(f"cluster {seeds[0][0]}:{seeds[0][1]} unreachable: "
                                 f"{text or type(exc).__name__}") from None  # fmt: skip
        r, client.slots = record, record.slots
        client.welcome = Welcome(0 if r.clearing else r.slots, capacity, state.store_id,
                                 state.boot, state.prev_boot, False, r.area_id, r.holder,
                                 r.floor)  # fmt: skip
        return client

    # -- what the agent's Store asks of a client ------------------------------------
    @property
    def connected(self) -> bool:
        return self._open

    @property
    def counters(self) -> dict[str, int]:
        return {**self.router.counters, **self.watch.counters,
                "pages_superseded": self.superseded}  # fmt: skip

    @property
    def node_figures(self) -> list[NodeFigures]:
        return self.watch.node_figures

    def on_lost(self, callback: Callable[[Exception], None]) -> None:
        self._on_lost = callback

    def _lost(self, why: Exception) -> None:
        if self._open:
            self._shut()
            if self._on_lost is not None:
                self._on_lost(why)

    def _shut(self) -> None:
        self._open = False
        self.router.closed = self.watch.closed = True

    def abort(self) -> None:
        self._shut()
        self._closing = asyncio.ensure_future(self.close())

    async def close(self) -> None:
        self._shut()
        await self.cluster.aclose()
        await self.watch.close()

    async def swapfile(self, activate: bool, slots: int, area_id: int = 0, holder: str = "",
                       force: bool = False) -> None:  # fmt: skip
        """Make, grow, replace or release the area (area.py); a replaced or released
        life's chunks are unlinked before it answers."""
        clearing = await self.record.claim(activate, slots, area_id, holder, force, self.epoch)
        if clearing:
            await self._discard_whole(list(range(chunks_of(clearing))))
            await self.record.cleared(clearing, self.epoch)
        if not activate:
            self.slots = 0
            return
        if area_id and area_id != self.watch.state.area_id:
            self.watch.renew(area_id)
        before, self.slots = self.slots, max(self.slots, slots)
        if self.epoch and self.slots > before:
            await self.record.fence_buckets(range(buckets_of(before), buckets_of(self.slots)),
                                            self.epoch)  # fmt: skip

    async def fence(self, epoch: int) -> None:
        """Raise the area's floor and every bucket's to `epoch` (ESTALE below one): the
        buckets of the area as it is now (another agent may have grown it)."""
        await self.record.fence(epoch)
        self.epoch = epoch
        self.slots = max(self.slots, (await self.record.read()).slots)
        await self.record.fence_buckets(range(buckets_of(self.slots)), epoch)

    async def stats(self) -> dict[str, int]:
        """Used pages and bytes (the masters' used_memory) and capacity bytes (their
        maxmemory); the nodes and the masters' histories looked at again (a possible
        loss reports the store lost)."""
        memory = await self.watch.memory()
        used = sum(int(info.get("used_memory", 0)) for info in memory)
        capacity = sum(int(info.get("maxmemory", 0)) or 1 << 40 for info in memory)
        if self._on_lost is not None:  # the agent's store holds this client (not at connect)
            with contextlib.suppress(Exception):  # a node failing: the next refresh tells
                await self.watch.refresh_figures()
            try:
                await self.watch.check()
            except ConnectionLost as exc:
                self._lost(exc)
        return {"used_pages": used // PAGE_SIZE, "used_bytes": used, "capacity_bytes": capacity}

    async def flush(self) -> None:
        """Nothing to do: a write was answered once WAIT had counted its replicas."""

    # -- batches ---------------------------------------------------------------------
    def start_swap_out(self, runs: Sequence[range], pages: Sequence[Buffer], tags: array[int],
                       generations: array[int], seals: Buffer | None,
                       done: Callable[[Exception | None], None]) -> None:  # fmt: skip
        try:
            cmds = batch.write_cmds(self.area, self.epoch, runs, pages, tags, generations, seals)
        except StoreError as refused:  # answered as any refusal is: later, on the loop
            asyncio.get_running_loop().call_soon(done, refused)
            return
        chunks = {p.chunk for p in pieces(runs)}
        self._background(self._write(cmds, chunks), lambda _, failure: done(failure))

    def start_swap_in(self, runs: Sequence[range], sealed: bool,
                      done: Callable[[Pages | None, Exception | None], None]) -> None:  # fmt: skip
        self._background(self._read(runs, sealed), done)

    async def read_pages(self, slots: Sequence[int], sealed: bool = False) -> Pages:
        return await self._read([range(s, s + 1) for s in slots], sealed)

    async def inventory(self, first: int,
                        count: int) -> tuple[array[int], array[int], array[int]]:  # fmt: skip
        """The slots of first..first+count-1 held (generation not 0), their generations
        and their payloads' lengths."""
        chunks, cmds = batch.inventory_cmds(self.area, first, count)
        await self.router.run(cmds)
        return batch.held_of(chunks, cmds, first, count)

    async def discard(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Whole chunks are unlinked; a part of one is cut out of its stream (its memory
        freed either way). A write to a chunk waits for its discard."""
        todo = [p for start, count in ranges for p in pieces([range(start, start + count)])]
        await self._discard([(p.chunk, p.offset, p.count) for p in todo])

    async def _discard_whole(self, chunks: list[int]) -> None:
        for at in range(0, len(chunks), UNLINK_BATCH):
            await self._discard([(c, 0, CHUNK_PAGES) for c in chunks[at : at + UNLINK_BATCH]])

    async def _discard(self, parts: list[tuple[int, int, int]]) -> None:
        mine: dict[int, asyncio.Event] = {}
        for chunk, _, _ in parts:
            if chunk not in self._discarding:
                mine[chunk] = self._discarding[chunk] = asyncio.Event()
        cmds = []
        for chunk, offset, count in parts:
            keys = [*chunk_keys(self.area, chunk), floor_key_of(self.area, chunk)]
            cmds.append(Cmd(keys[0], *DISCARD.args(keys, self.epoch, offset, count)))
        try:
            await self.router.run(cmds, write=True)
        finally:
            for chunk, event in mine.items():
                del self._discarding[chunk]
                event.set()

    # -- the work -------------------------------------------------------------------
    async def _write(self, cmds: list[Cmd], chunks: set[int]) -> None:
        for event in [self._discarding[c] for c in chunks if c in self._discarding]:
            await event.wait()
        await self.router.run(cmds, write=True)
        self.superseded += sum(int(c.result) for c in cmds)

    async def _read(self, runs: Sequence[range], sealed: bool) -> Pages:
        plan, cmds = batch.read_cmds(self.area, runs, sealed)
        await self.router.run(cmds)
        return batch.pages_of(plan, cmds, sealed)

    def _background(self, work: Any, done: Callable[[Any, Exception | None], None]) -> None:
        task = asyncio.ensure_future(work)

        def finished(t: asyncio.Future[Any]) -> None:
            failure = t.exception() if not t.cancelled() else ConnectionLost("cancelled")
            if isinstance(failure, ConnectionLost):
                self._lost(failure)
            elif failure is not None and not isinstance(failure, StoreError):
                failure = ConnectionLost(f"the cluster client failed: {failure!r}")
                self._lost(failure)
            done(None if failure is not None else t.result(), failure)

        task.add_done_callback(finished)
