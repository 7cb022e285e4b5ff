"""The agent's client for a Redis-protocol cluster, in place of a netswap store.

It answers the calls the agent makes of a store's client (rpc.StoreClient):
batches (start_swap_out / start_swap_in), Inventory for a rebuild, Discard, the
area's activation and release, and stats. A batch is cut into chunk pieces
(layout.py), its commands grouped by the node that owns each key's hash slot, and
each node's commands sent as one pipeline on one connection (redis-py's
ClusterNode.execute_pipeline); a write pipeline ends with WAIT, which counts the
replicas that have this connection's writes, so an acknowledged page is on
`wait` replicas too (after the wait_ms deadline it is acknowledged anyway and
counted: a replica down must not stop swap). Redirections and failures -- MOVED
and ASK while slots migrate, a master gone until its replica is promoted -- are
retried, the topology refreshed, until the request's deadline; then the agent
sees the store down, as with any store. Out of memory is ENOSPC, a refused
password or key EACCES.

What it never does is decide a page is good: the generations and tags it reads
back go to the agent's own check (rpc.check_pages), so a page a failover rolled
back is EIO, never stale data.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from netswap.protocol import PAGE_SIZE, SEAL_SIZE, Pages, StoreError, area_seed
from netswap.protocol.errors import ConnectionLost
from netswap.protocol.messages import Buffer
from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster

from .layout import (
    GEN_SIZE,
    MAKE_SCRIPT,
    META_BYTES,
    PAGES_BYTES,
    SEALS_AT,
    TAG_SIZE,
    TAGS_AT,
    area_key,
    chunk_keys,
    chunks_of,
    pieces,
)

log = logging.getLogger("netswap.agent")

# Worth another try (the topology refreshed first): the cluster is moving or failing over.
RETRY = (rx.MovedError, rx.AskError, rx.ClusterDownError, rx.TryAgainError, rx.ConnectionError,
         rx.TimeoutError, rx.MasterDownError, rx.BusyLoadingError, rx.ReadOnlyError,
         rx.SlotNotCoveredError)  # fmt: skip
BACKOFF_S = (0.05, 0.1, 0.2, 0.5)
# How long a write's WAIT waits for its replicas before the write is acknowledged all the
# same (and counted as unreplicated): a replica on loopback or a LAN answers in a
# millisecond or two; one that is down or resyncing must not hold swap-out for seconds.
WAIT_MS = 200
# UNLINK keys per pipeline when an area is released or discarded: bounded work per call.
UNLINK_BATCH = 512


@dataclass(frozen=True)
class NodeFigures:
    """One node as the ops endpoint shows it: CLUSTER NODES and its INFO memory."""

    name: str
    role: str  # "master" or "replica"
    up: bool
    used_bytes: int
    max_bytes: int


@dataclass(frozen=True)
class Welcome:
    """What rpc.StoreClient's Welcome says, for the cluster."""

    area_slots: int
    capacity_pages: int


class Cmd:
    """One command of a batch, and where it goes (an ASK sends it elsewhere, once)."""

    __slots__ = ("args", "ask", "key", "result")

    def __init__(self, key: str, *args: Any) -> None:
        self.key, self.args = key, args
        self.ask: tuple[str, int] | None = None
        self.result: Any = None


class ClusterClient:
    def __init__(self, cluster: RedisCluster, area: str, deadline: float, wait: int,
                 wait_ms: int) -> None:  # fmt: skip
        self.cluster, self.area, self.deadline = cluster, area, deadline
        self.wait, self.wait_ms = wait, wait_ms
        self.area_seed = area_seed(area)
        self.welcome: Welcome | None = None
        self.made: set[int] = set()  # chunks known to exist at their final size
        self.counters = {"unreplicated_writes": 0, "redirects": 0, "retries": 0}
        self.node_figures: list[NodeFigures] = []  # as of the last stats()
        self._directs: dict[str, Redis] = {}
        self._open = True
        self._closing: asyncio.Future[None] | None = None
        self._on_lost: Callable[[Exception], None] | None = None

    @classmethod
    async def connect(cls, seeds: Sequence[tuple[str, int]], area: str, user: str,
                      password: str, deadline: float, wait: int = 1,
                      wait_ms: int = 0) -> ClusterClient:  # fmt: skip
        cluster = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in seeds],
                               username=user or None, password=password or None,
                               socket_timeout=deadline, socket_connect_timeout=deadline,
                               require_full_coverage=False,
                               cluster_error_retry_attempts=1)  # fmt: skip
        try:
            async with asyncio.timeout(deadline):
                await cluster.initialize()
                raw = await cluster.get(area_key(area))
        except Exception as exc:  # redis-py wraps some in RedisClusterException
            await cluster.aclose()
            text = str(exc)
            refused = ("WRONGPASS", "NOAUTH", "NOPERM", "invalid username")
            if isinstance(exc, rx.AuthenticationError | rx.NoPermissionError) or any(
                word in text for word in refused
            ):
                raise StoreError(errno.EACCES, f"the cluster refused user "
                                 f"{user or 'default'}: {text}") from None  # fmt: skip
            raise ConnectionLost(f"cluster {seeds[0][0]}:{seeds[0][1]} unreachable: "
                                 f"{text or type(exc).__name__}") from None  # fmt: skip
        client = cls(cluster, area, deadline, wait, wait_ms or WAIT_MS)
        client.welcome = Welcome(int(raw or 0), await client._capacity_pages())
        return client

    # -- what the agent's Store asks of a client ------------------------------------
    @property
    def connected(self) -> bool:
        return self._open

    def on_lost(self, callback: Callable[[Exception], None]) -> None:
        self._on_lost = callback

    def abort(self) -> None:
        self._open = False
        self._closing = asyncio.ensure_future(self.cluster.aclose())

    async def close(self) -> None:
        self._open = False
        await self.cluster.aclose()
        for direct in self._directs.values():
            await direct.aclose()

    async def swapfile(self, activate: bool, slots: int) -> None:
        key = area_key(self.area)
        if activate:
            await self._run([Cmd(key, "SET", key, slots)])
            return
        held = int(await self.cluster.get(key) or 0)
        await self._unlink_chunks(range(chunks_of(held)))
        await self._run([Cmd(key, "UNLINK", key)])
        self.made.clear()

    async def stats(self) -> dict[str, int]:
        """Used pages (the masters' used_memory), and every node's figures refreshed."""
        used = sum(int(info.get("used_memory", 0)) for info in await self._memory())
        with contextlib.suppress(rx.RedisError, OSError):
            self.node_figures = await self._nodes()
        return {"used_pages": used // PAGE_SIZE}

    async def _nodes(self) -> list[NodeFigures]:
        figures = []
        for name, node in sorted((await self.cluster.cluster_nodes()).items()):
            flags = str(node.get("flags", ""))
            up = bool(node.get("connected")) and "fail" not in flags
            info: dict[str, Any] = {}
            if up:
                with contextlib.suppress(rx.RedisError, OSError):
                    info = await self._direct(name).info("memory")
            figures.append(NodeFigures(name, "master" if "master" in flags else "replica", up,
                                       int(info.get("used_memory", 0)),
                                       int(info.get("maxmemory", 0))))  # fmt: skip
        return figures

    async def _memory(self) -> list[dict[str, Any]]:
        """INFO memory of each master that answers (one failing over does not)."""
        out = []
        for node in self.cluster.get_primaries():
            with contextlib.suppress(rx.RedisError, OSError):
                out.append(await self.cluster.info("memory", target_nodes=node))
        return out

    async def flush(self) -> None:
        """Nothing to do: a write was answered once WAIT had counted its replicas."""

    # -- batches ---------------------------------------------------------------------
    def start_swap_out(self, runs: Sequence[range], pages: Sequence[Buffer], tags: array[int],
                       generations: array[int], seals: Buffer | None,
                       done: Callable[[Exception | None], None]) -> None:  # fmt: skip
        cmds, made = self._write_cmds(runs, pages, tags, generations, seals)  # copies now
        self._background(self._write(cmds, made), lambda _, failure: done(failure))

    def start_swap_in(self, runs: Sequence[range], sealed: bool,
                      done: Callable[[Pages | None, Exception | None], None]) -> None:  # fmt: skip
        self._background(self._read(runs, sealed), done)

    async def read_pages(self, slots: Sequence[int], sealed: bool = False) -> Pages:
        runs = [range(s, s + 1) for s in slots]
        return await self._read(runs, sealed)

    async def inventory(self, first: int, count: int) -> tuple[array[int], array[int]]:
        """The slots of first..first+count-1 held (generation not 0), and their generations."""
        chunks = range(first // (PAGES_BYTES // PAGE_SIZE),
                       (first + count - 1) // (PAGES_BYTES // PAGE_SIZE) + 1)  # fmt: skip
        cmds = [Cmd(m, "GETRANGE", m, 0, TAGS_AT - 1)
                for m in (chunk_keys(self.area, c)[1] for c in chunks)]  # fmt: skip
        await self._run(cmds)
        slots, gens = array("Q"), array("Q")
        per = PAGES_BYTES // PAGE_SIZE
        for chunk, cmd in zip(chunks, cmds, strict=True):
            held = array("Q")
            held.frombytes(bytes(cmd.result or b"").ljust(TAGS_AT, b"\0"))
            for i, gen in enumerate(held):
                slot = chunk * per + i
                if gen and first <= slot < first + count:
                    slots.append(slot)
                    gens.append(gen)
        return slots, gens

    async def discard(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Whole chunks are unlinked (their memory freed); a part of one has its
        generations zeroed (held no longer)."""
        per = PAGES_BYTES // PAGE_SIZE
        whole: list[int] = []
        cmds: list[Cmd] = []
        for start, count in ranges:
            for piece in pieces([range(start, start + count)]):
                if piece.count == per:
                    whole.append(piece.chunk)
                    continue
                m = chunk_keys(self.area, piece.chunk)[1]
                cmds.append(Cmd(m, "SETRANGE", m, piece.offset * GEN_SIZE,
                                bytes(piece.count * GEN_SIZE)))  # fmt: skip
        await self._run(cmds)
        await self._unlink_chunks(whole)

    # -- the work -------------------------------------------------------------------
    def _write_cmds(self, runs: Sequence[range], pages: Sequence[Buffer], tags: array[int],
                    generations: array[int], seals: Buffer | None,
                    ) -> tuple[list[Cmd], set[int]]:  # fmt: skip
        cmds: list[Cmd] = []
        new: set[int] = set()
        seal_view = memoryview(seals) if seals is not None else None
        for p in pieces(runs):
            pk, mk = chunk_keys(self.area, p.chunk)
            if p.chunk not in self.made and p.chunk not in new:
                new.add(p.chunk)
                cmds.append(Cmd(pk, "EVAL", MAKE_SCRIPT, 2, pk, mk, PAGES_BYTES, META_BYTES))
            i, n, off = p.index, p.count, p.offset
            data = b"".join(bytes(pages[j]) for j in range(i, i + n))
            cmds.append(Cmd(pk, "SETRANGE", pk, off * PAGE_SIZE, data))
            cmds.append(Cmd(mk, "SETRANGE", mk, off * GEN_SIZE, generations[i : i + n].tobytes()))
            cmds.append(Cmd(mk, "SETRANGE", mk, TAGS_AT + off * TAG_SIZE,
                            tags[i : i + n].tobytes()))  # fmt: skip
            if seal_view is not None:
                cmds.append(Cmd(mk, "SETRANGE", mk, SEALS_AT + off * SEAL_SIZE,
                                bytes(seal_view[i * SEAL_SIZE : (i + n) * SEAL_SIZE])))  # fmt: skip
        return cmds, new

    async def _write(self, cmds: list[Cmd], new: set[int]) -> Pages | None:
        await self._run(cmds, wait=self.wait)
        self.made |= new
        return None

    async def _read(self, runs: Sequence[range], sealed: bool) -> Pages:
        cmds: list[Cmd] = []
        plan = list(pieces(runs))
        for p in plan:
            pk, mk = chunk_keys(self.area, p.chunk)
            off, n = p.offset, p.count
            cmds.append(Cmd(pk, "GETRANGE", pk, off * PAGE_SIZE, (off + n) * PAGE_SIZE - 1))
            cmds.append(Cmd(mk, "GETRANGE", mk, off * GEN_SIZE, (off + n) * GEN_SIZE - 1))
            cmds.append(Cmd(mk, "GETRANGE", mk, TAGS_AT + off * TAG_SIZE,
                            TAGS_AT + (off + n) * TAG_SIZE - 1))  # fmt: skip
            if sealed:
                cmds.append(Cmd(mk, "GETRANGE", mk, SEALS_AT + off * SEAL_SIZE,
                                SEALS_AT + (off + n) * SEAL_SIZE - 1))  # fmt: skip
        await self._run(cmds)
        total = sum(p.count for p in plan)
        data, gens, tags = bytearray(total * PAGE_SIZE), array("Q"), array("I")
        seals = bytearray(total * SEAL_SIZE) if sealed else None
        step = 4 if sealed else 3
        for k, p in enumerate(plan):
            got = [bytes(c.result or b"") for c in cmds[k * step : (k + 1) * step]]
            n, at = p.count, p.index
            data[at * PAGE_SIZE : (at + n) * PAGE_SIZE] = got[0].ljust(n * PAGE_SIZE, b"\0")
            gens.frombytes(got[1].ljust(n * GEN_SIZE, b"\0"))  # a chunk never made: 0
            tags.frombytes(got[2].ljust(n * TAG_SIZE, b"\0"))
            if seals is not None:
                seals[at * SEAL_SIZE : (at + n) * SEAL_SIZE] = got[3].ljust(n * SEAL_SIZE, b"\0")
        return Pages(0, data, tags, gens, seals)

    async def _unlink_chunks(self, chunks: Sequence[int]) -> None:
        for at in range(0, len(chunks), UNLINK_BATCH):
            cmds = []
            for chunk in chunks[at : at + UNLINK_BATCH]:
                self.made.discard(chunk)
                cmds += [Cmd(k, "UNLINK", k) for k in chunk_keys(self.area, chunk)]
            await self._run(cmds)

    async def _run(self, cmds: list[Cmd], wait: int = 0) -> None:
        """Every command answered (results in cmd.result), redirections and failovers
        retried until the deadline; a write's pipelines end with WAIT `wait`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.deadline
        pending, attempt = cmds, 0
        while pending:
            by_node: dict[str, tuple[ClusterNode, list[Cmd]]] = {}
            for cmd in pending:
                node = self._node(cmd)
                by_node.setdefault(node.name, (node, []))[1].append(cmd)
            outcomes = await asyncio.gather(*(self._pipeline(node, group, wait)
                                              for node, group in by_node.values()))  # fmt: skip
            pending = [cmd for retry in outcomes for cmd in retry]
            if not pending:
                return
            self.counters["retries"] += 1
            if loop.time() > end:
                raise ConnectionLost(f"the cluster did not answer within {self.deadline:.0f}s "
                                     f"({type(pending[0].result).__name__}: "
                                     f"{pending[0].result})")  # fmt: skip
            await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            attempt += 1
            with contextlib.suppress(rx.RedisError, OSError):  # the next round tells
                await self.cluster.nodes_manager.initialize()

    def _node(self, cmd: Cmd) -> ClusterNode:
        if cmd.ask is not None:
            node = self.cluster.get_node(*cmd.ask)
            if node is not None:
                return node
        node = self.cluster.get_node_from_key(cmd.key)
        if node is None:
            raise ConnectionLost(f"no node owns {cmd.key}")
        return node

    async def _pipeline(self, node: ClusterNode, group: list[Cmd], wait: int) -> list[Cmd]:
        """One node's commands on one connection; returns those to try again."""
        commands: list[PipelineCommand] = []
        for cmd in group:
            if cmd.ask is not None:
                commands.append(PipelineCommand(len(commands), "ASKING"))
            commands.append(PipelineCommand(len(commands), *cmd.args))
        wait = min(wait, self._replicas(group[0].key)) if wait else 0
        if wait:
            commands.append(PipelineCommand(len(commands), "WAIT", wait, self.wait_ms))
        try:
            await node.execute_pipeline(commands)
        except RETRY as exc:
            for cmd in group:
                cmd.result = exc
            return group
        results = [c.result for c in commands if c.args[0] != "ASKING"]
        retry: list[Cmd] = []
        for cmd, result in zip(group, results, strict=False):
            cmd.result, cmd.ask = result, None
            if isinstance(result, rx.AskError):
                cmd.ask = (result.host, result.port)
                self.counters["redirects"] += 1
                retry.append(cmd)
            elif isinstance(result, RETRY):
                retry.append(cmd)
            elif isinstance(result, rx.OutOfMemoryError):
                raise StoreError(errno.ENOSPC, f"the cluster is full ({node.name}: {result})")
            elif isinstance(result, rx.NoPermissionError | rx.AuthenticationError):
                raise StoreError(errno.EACCES, f"{node.name} refused {cmd.key}: {result}")
            elif isinstance(result, Exception):
                raise StoreError(errno.EIO, f"{node.name}: {cmd.args[0]} {cmd.key}: {result}")
        if wait and not retry and isinstance(results[-1], int) and results[-1] < wait:
            self.counters["unreplicated_writes"] += len(group)
        return retry

    def _direct(self, name: str) -> Redis:
        """A plain client to one node (replicas too: the cluster client routes to
        masters only), one per node, kept."""
        client = self._directs.get(name)
        if client is None:
            host, _, port = name.rpartition(":")
            kwargs = self.cluster.nodes_manager.connection_kwargs
            client = self._directs[name] = Redis(
                host=host, port=int(port), username=kwargs.get("username"),
                password=kwargs.get("password"), socket_timeout=self.deadline,
                socket_connect_timeout=self.deadline,
            )  # fmt: skip
        return client

    def _replicas(self, key: str) -> int:
        """Replicas the cluster has for this key's slot now (WAIT for more would only
        time out)."""
        owners = self.cluster.nodes_manager.slots_cache.get(self.cluster.keyslot(key), [])
        return max(0, len(owners) - 1)

    async def _capacity_pages(self) -> int:
        """The masters' maxmemory (2^40 bytes for one without a limit)."""
        return sum(int(i.get("maxmemory", 0)) or 1 << 40 for i in await self._memory()) // PAGE_SIZE

    def _background(self, work: Any, done: Callable[[Any, Exception | None], None]) -> None:
        task = asyncio.ensure_future(work)

        def finished(t: asyncio.Future[Any]) -> None:
            failure = t.exception() if not t.cancelled() else ConnectionLost("cancelled")
            if isinstance(failure, ConnectionLost) and self._on_lost is not None:
                self._open = False
                self._on_lost(failure)
            done(None if failure is not None else t.result(), failure)  # type: ignore[arg-type]

        task.add_done_callback(finished)
