"""Commands to the nodes that own their keys: one pipeline per node, retried to a deadline.

A request's commands are grouped by the master that owns each key's hash slot and
each group is sent as one pipeline on one connection (redis-py's ClusterNode). A
write's pipeline ends with WAIT, whose answer -- the replicas holding every write
of this connection so far -- goes to `on_wait` before the request completes: the
client's lineage record (lineage.py) must know of a write acknowledged short of
its replicas before the agent does.

What comes back is sorted three ways, and the third is the point:
- an answer the agent must see as a refusal with an errno: out of memory (ENOSPC),
  a refused key (EACCES), a script's own ESTALE / EEXIST / EINVAL, and anything
  else a node says about the data (EIO);
- ASK (that key, once, to the node named) and NOSCRIPT (the script's body next);
- everything that means the cluster is moving or failing over -- a node that does
  not answer, MOVED, CLUSTERDOWN, TRYAGAIN, READONLY, LOADING, a slot no node
  serves, an error this code does not know -- is tried again, the topology
  refreshed (`on_topology` runs after each refresh), until the request's deadline;
  then ConnectionLost: the agent sees a store that does not answer (it waits for
  it), never an errno it would take as the store's verdict on a page.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import Awaitable, Callable
from typing import Any

from netswap.protocol import StoreError
from netswap.protocol.errors import ConnectionLost
from redis import exceptions as rx
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster

from .scripts import BY_SHA

BACKOFF_S = (0.05, 0.1, 0.2, 0.5)
# Errors a script answers with, by their first word (scripts.py).
SCRIPT_ERRNOS = {"ESTALE": errno.ESTALE, "EEXIST": errno.EEXIST, "EINVAL": errno.EINVAL}
# Replies that mean the node is changing role or the cluster is reconfiguring: as
# redis-py parses them (MOVED and ASK lose their word: their text is "SLOT HOST:PORT"),
# and by their first words for those it leaves as plain ResponseError.
MOVING = (rx.AskError, rx.TryAgainError, rx.ClusterError, rx.ReadOnlyError)
TRANSIENT = ("UNBLOCKED", "LOADING", "READONLY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN",
             "MOVED", "ASK", "WAIT cannot be used")  # fmt: skip


class Cmd:
    """One command, where it goes (an ASK sends it elsewhere, once), and its answer."""

    __slots__ = ("args", "ask", "key", "result")

    def __init__(self, key: str, *args: Any) -> None:
        self.key, self.args = key, args
        self.ask: tuple[str, int] | None = None
        self.result: Any = None


class Router:
    def __init__(self, cluster: RedisCluster, deadline: float, wait: int, wait_ms: int) -> None:
        self.cluster, self.deadline = cluster, deadline
        self.wait, self.wait_ms = wait, wait_ms
        self.closed = False
        self.counters = {"redirects": 0, "retries": 0}
        self.on_wait: Callable[[str, int], Awaitable[None]] = _nothing_waited
        self.on_topology: Callable[[], Awaitable[None]] = _nothing
        self.live_replicas: Callable[[str], int] = lambda node: 0  # WAIT for how many

    async def run(self, cmds: list[Cmd], write: bool = False) -> None:
        """Every command answered (cmd.result), or StoreError, or ConnectionLost at the
        deadline. `write`: each node's pipeline ends with WAIT."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.deadline
        pending, attempt = cmds, 0
        while pending:
            if self.closed:
                raise ConnectionLost("the cluster client was closed")
            groups: dict[str, tuple[ClusterNode, list[Cmd]]] = {}
            stray: list[Cmd] = []
            for cmd in pending:
                node = self._node(cmd)
                if node is None:
                    stray.append(cmd)
                else:
                    groups.setdefault(node.name, (node, []))[1].append(cmd)
            outcomes = await asyncio.gather(*(self._pipeline(node, group, write)
                                              for node, group in groups.values()))  # fmt: skip
            pending = stray + [cmd for retry, _ in outcomes for cmd in retry]
            if not pending:
                return
            if loop.time() > end:
                first = pending[0].result
                raise ConnectionLost(f"the cluster did not answer within {self.deadline:.0f}s "
                                     f"({type(first).__name__}: {first})")  # fmt: skip
            if stray or any(slow for _, slow in outcomes):  # not only ASK or NOSCRIPT
                self.counters["retries"] += 1
                await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
                attempt += 1
                await self.refresh(end - loop.time())

    async def refresh(self, within: float) -> None:
        """The topology again (a failing node may not answer: the next round tells)."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(max(0.05, within)):
                await self.cluster.nodes_manager.initialize()
        await self.on_topology()

    def _node(self, cmd: Cmd) -> ClusterNode | None:
        if cmd.ask is not None:
            node = self.cluster.get_node(*cmd.ask)
            if node is not None:
                return node
        try:
            return self.cluster.get_node_from_key(cmd.key)
        except rx.SlotNotCoveredError as exc:  # failing over: no master for it yet
            cmd.result = exc
            return None

    async def _pipeline(self, node: ClusterNode, group: list[Cmd],
                        write: bool) -> tuple[list[Cmd], bool]:  # fmt: skip
        """One node's commands on one connection: those to try again, and whether
        that needs the topology refreshed first."""
        commands: list[PipelineCommand] = []
        for cmd in group:
            if cmd.ask is not None:
                commands.append(PipelineCommand(len(commands), "ASKING"))
            commands.append(PipelineCommand(len(commands), *cmd.args))
        want = min(self.wait, self.live_replicas(node.name)) if write else 0
        if want:
            commands.append(PipelineCommand(len(commands), "WAIT", want, self.wait_ms))
        try:
            await node.execute_pipeline(commands)
        except Exception as exc:  # the node did not answer: as the cluster moving
            for cmd in group:
                cmd.result = exc
            return group, True
        results = [c.result for c in commands if c.args[0] != "ASKING"]
        retry: list[Cmd] = []
        slow = False
        for cmd, result in zip(group, results, strict=False):
            cmd.result, cmd.ask = result, None
            if not isinstance(result, Exception):
                continue
            retry.append(cmd)
            if isinstance(result, rx.AskError) and not isinstance(result, rx.MovedError):
                cmd.ask = (result.host, result.port)
                self.counters["redirects"] += 1
            elif isinstance(result, rx.NoScriptError) and cmd.args[1] in BY_SHA:
                cmd.args = BY_SHA[cmd.args[1]].with_body(cmd.args)
            else:
                failure = refusal(node.name, cmd, result)
                if failure is not None:
                    raise failure
                slow = True
        if write and len(retry) < len(group):  # some writes landed: what WAIT said of them
            acked = results[-1] if want else 0
            await self.on_wait(node.name, acked if isinstance(acked, int) else 0)
        return retry, slow


def refusal(where: str, cmd: Cmd, result: Exception) -> StoreError | None:
    """The errno the agent must see for a node's answer; None: the cluster is moving."""
    text = str(result)
    if isinstance(result, rx.OutOfMemoryError):
        return StoreError(errno.ENOSPC, f"the cluster is full ({where}: {text})")
    if isinstance(result, rx.NoPermissionError | rx.AuthenticationError):
        return StoreError(errno.EACCES, f"{where} refused {cmd.key}: {text}")
    if not isinstance(result, rx.ResponseError) or isinstance(result, MOVING):
        return None  # a connection, a timeout, MOVED, CLUSTERDOWN, TRYAGAIN, ...
    word = text.split(" ", 1)[0]
    if word in SCRIPT_ERRNOS:
        return StoreError(SCRIPT_ERRNOS[word], text.split(" ", 1)[-1])
    if any(text.startswith(t) for t in TRANSIENT):
        return None
    return StoreError(errno.EIO, f"{where}: {cmd.args[0]} {cmd.key}: {text}")


async def _nothing_waited(node: str, acked: int) -> None:
    return None


async def _nothing() -> None:
    return None
