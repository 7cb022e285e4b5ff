"""What the client knows of the cluster's masters: their histories, their replicas, and
whether an acknowledged write may be missing from one of those replicas (lineage.py).

- At a connect (`begin`), the masters' histories now are judged against the state the
  last client left (this process's, or the keyring's after a restart): a change that
  may have lost an acknowledged write makes a new boot, which the Welcome carries.
- On every write's WAIT answer (`on_wait`, before the write is acknowledged): fewer
  than all of the master's replicas (CLUSTER NODES, failed ones too: a replica that
  comes back may be promoted before it has caught up) puts the master in doubt,
  recorded at once; all of them clears it.
- After a topology refresh and every usage refresh (`check`): a master that changed is
  judged; a possible loss is reported as the store lost (ConnectionLost), so the
  agent reconnects and the new boot makes its replicas SUSPECT.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from dataclasses import dataclass
from typing import Any

from netswap.protocol import PAGE_SIZE, StoreError
from netswap.protocol.errors import ConnectionLost
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from .lineage import Durable, Entry, Keeper, Master, State, judge, random_id

log = logging.getLogger("netswap.agent")

# How long the figures wait for one node's INFO memory (a paused node would hold them
# for the whole socket timeout).
FIGURES_S = 1.0


@dataclass(frozen=True)
class NodeFigures:
    """One node as the ops endpoint shows it: CLUSTER NODES and its INFO memory."""

    name: str
    role: str  # "master" or "replica"
    up: bool
    used_bytes: int
    max_bytes: int


class Watch:
    def __init__(self, cluster: RedisCluster, area: str, deadline: float,
                 durable: Durable | None) -> None:  # fmt: skip
        self.cluster, self.deadline = cluster, deadline
        self.keeper = Keeper(area, durable)
        self.state = State(0, 0, 0)
        self.totals: dict[str, int] = {}  # master address -> replicas it has, failed or not
        self.live: dict[str, int] = {}  # master address -> replicas not failed (WAIT for them)
        self.node_figures: list[NodeFigures] = []  # as of the last refresh
        self.counters = {"unreplicated_writes": 0, "doubts": 0, "takeovers": 0}
        self.closed = False  # a client given up: it acknowledges and records nothing more
        self._directs: dict[str, Redis] = {}
        self._unsaved = False  # a doubt cleared, not yet in the keyring (clearing can wait)

    # -- at a connect -----------------------------------------------------------------
    async def begin(self, area_id: int) -> State:
        """The state the cluster answers with now (its boot), recorded before it is told."""
        now = await self.masters()
        await self.count_replicas()
        try:
            old = self.keeper.load()
        except (OSError, ValueError) as exc:  # the keyring refused, or a torn entry
            log.warning("the cluster's lineage record could not be read (%s): the cluster "
                        "answers as a new boot", exc)  # fmt: skip
            old = None
        if old is None or old.area_id != area_id:
            state = State.fresh(area_id, now, old.store_id if old is not None else 0)
        else:
            masters, losses = judge(old.masters, now)
            state = old
            if losses:
                log.warning("the cluster may have lost acknowledged writes (%s): it answers as"
                            " a new boot, every page checked", "; ".join(losses))  # fmt: skip
                state = State(area_id, old.store_id, random_id(), old.boot, masters)
            state.masters = masters
        self._save(state)
        return state

    def renew(self, area_id: int) -> None:
        """A new life of the area (its old chunks go): no doubt about the old one matters."""
        state = self.state
        state.area_id = area_id
        state.masters = {a: Entry(e.replid) for a, e in state.masters.items()}
        self._save(state)

    # -- while it runs -----------------------------------------------------------------
    async def on_wait(self, node: str, acked: int) -> None:
        """A write pipeline on `node` landed and WAIT counted `acked` replicas."""
        if self.closed:  # its state may be a newer client's now
            raise ConnectionLost("the cluster client was closed")
        if node not in self.state.masters:  # a master not judged yet: a takeover, a new one
            await self.check(only=node)
        if node not in self.totals:
            await self.count_replicas()  # unknown, no WAIT was sent: acked is 0
        entry = self.state.masters.get(node)
        if entry is None:
            raise ConnectionLost(f"{node} is no longer a master")
        if acked >= self.totals.get(node, 0):
            self._unsaved |= entry.doubt
            entry.doubt = False
            return
        self.counters["unreplicated_writes"] += 1
        if not entry.doubt:
            entry.doubt = True
            self.counters["doubts"] += 1
            self._save(self.state)

    async def check(self, only: str | None = None, refresh: bool = True) -> None:
        """Judge the masters (or one) against the state; ConnectionLost on a possible
        loss (nothing recorded: the reconnect judges it again and makes the new boot).
        A master that does not answer has the topology refreshed (`refresh`: a failover
        is seen without waiting for a request to run into it), else it is left for the
        next check."""
        if self.closed:
            return
        try:
            now = await self.masters(only)
        except ConnectionLost:
            if only is not None:
                raise
            if not refresh:
                return
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.deadline):
                    await self.cluster.nodes_manager.initialize()
            try:
                now = await self.masters()
            except ConnectionLost:
                return
        masters, losses = judge(self.state.masters, now)
        if losses:
            raise ConnectionLost("the cluster may have lost acknowledged writes: "
                                 + "; ".join(losses))  # fmt: skip
        changed = {a for a, e in masters.items() if self.state.masters.get(a) != e}
        if only is None:
            changed |= set(self.state.masters) - set(masters)
        else:
            masters = {**self.state.masters, **masters}
        if changed:
            self.counters["takeovers"] += 1
            self.state.masters = masters
            self._save(self.state)
        elif self._unsaved:
            self._save(self.state)

    async def masters(self, only: str | None = None) -> list[Master]:
        """The masters serving slots now and their histories (INFO replication); raises
        ConnectionLost when one does not answer or is not a master any more."""
        nodes = [n for n in self.cluster.get_primaries() if only is None or n.name == only]
        if only is not None and not nodes:
            raise ConnectionLost(f"{only} is not a master any more")
        return list(await asyncio.gather(*(self._history(n) for n in nodes)))

    async def _history(self, node: ClusterNode) -> Master:
        try:
            async with asyncio.timeout(self.deadline):
                info: dict[str, Any] = await node.execute_command("INFO", "replication")
        except Exception as exc:  # a node failing or failing over
            raise ConnectionLost(f"{node.name} unreachable: {exc or type(exc).__name__}") from None
        if str(info.get("role")) != "master":
            raise ConnectionLost(f"{node.name} is a {info.get('role')} now")
        return Master(node.name, _replid(info.get("master_replid")),
                      _replid(info.get("master_replid2")))  # fmt: skip

    async def count_replicas(self) -> dict[str, dict[str, Any]]:
        """Each master's replicas (CLUSTER NODES: CLUSTER SLOTS leaves out a replica
        the cluster has not yet heard an offset from, as on a cluster never written);
        returns the nodes."""
        nodes: dict[str, dict[str, Any]] = await self.cluster.cluster_nodes()
        ids = {d["node_id"]: address for address, d in nodes.items()}
        totals = {address: 0 for address, d in nodes.items() if "master" in str(d["flags"])}
        live = dict(totals)
        for d in nodes.values():
            master = ids.get(str(d.get("master_id", "-")))
            if master in totals:
                totals[master] += 1
                live[master] += "fail" not in str(d["flags"]).split(",")
        self.totals, self.live = totals, live
        return nodes

    async def refresh_figures(self) -> None:
        """Every node's role, state and memory, for the ops endpoint (a node that does
        not answer within FIGURES_S shows no memory: one paused must not hold the rest)."""
        nodes = await self.count_replicas()

        async def memory(name: str) -> dict[str, Any]:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(FIGURES_S):
                    info: dict[str, Any] = await self._direct(name).info("memory")
                    return info
            return {}

        names = sorted(nodes)
        ups = [bool(nodes[n].get("connected")) and "fail" not in str(nodes[n].get("flags"))
               for n in names]  # fmt: skip
        infos = await asyncio.gather(*(memory(n) for n, up in zip(names, ups, strict=True) if up))
        figures, got = [], iter(infos)
        for name, up in zip(names, ups, strict=True):
            info = next(got) if up else {}
            role = "master" if "master" in str(nodes[name].get("flags")) else "replica"
            figures.append(NodeFigures(name, role, up, int(info.get("used_memory", 0)),
                                       int(info.get("maxmemory", 0))))  # fmt: skip
        self.node_figures = figures

    async def memory(self) -> list[dict[str, Any]]:
        """INFO memory of each master that answers (one failing over does not)."""

        async def one(node: ClusterNode) -> dict[str, Any] | None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.deadline):
                    info: dict[str, Any] = await node.execute_command("INFO", "memory")
                    return info
            return None

        got = await asyncio.gather(*(one(n) for n in self.cluster.get_primaries()))
        return [info for info in got if info is not None]

    async def capacity_pages(self) -> int:
        """The masters' maxmemory (2^40 bytes for one without a limit), in pages."""
        total = sum(int(i.get("maxmemory", 0)) or 1 << 40 for i in await self.memory())
        return total // PAGE_SIZE

    def _save(self, state: State) -> None:
        try:
            self.keeper.save(state)
        except OSError as exc:  # the keyring refused (keys.KeyringError)
            raise StoreError(errno.EIO, f"the cluster's lineage record cannot be written "
                             f"({exc}): no write is acknowledged without it") from None  # fmt: skip
        self.state, self._unsaved = state, False

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

    async def close(self) -> None:
        for direct in self._directs.values():
            await direct.aclose()


def _replid(value: Any) -> str:
    """A replication id as INFO has it: 40 hex digits (redis-py reads an all-digit one,
    as the zeros of no master_replid2, as a number)."""
    return f"{value:040d}" if isinstance(value, int) else str(value or "")
