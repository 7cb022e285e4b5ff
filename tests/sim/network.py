"""The simulated network: one link per (agent, store) connection, with latency and faults.

A link carries requests to its store and replies back, each after the world's
latency. Every request has the agent's deadline (the real RPC deadline): an
answer that is not back by then is a failure of the link, which the agent
closes -- but requests already on their way, or waiting at a stalled store,
still arrive and are served (the frames of a connection the agent gave up on,
or of an agent that died). A partition drops everything to and from a store;
a lag delays what goes to it, so a late frame can land after a newer
connection's (reordering across connections).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .stores import Session, SimStore
from .world import World

UNREACHABLE = -1


class Network:
    def __init__(self, world: World) -> None:
        self.world = world
        self.partitioned: set[int] = set()  # store indexes cut off
        self.lag: dict[int, float] = {}  # store index -> extra seconds on the way there


class Link:
    def __init__(self, net: Network, store: SimStore, deadline: float,
                 on_failure: Callable[[Link], None]) -> None:  # fmt: skip
        self.net, self.store, self.deadline = net, store, deadline
        self.session = Session(self)
        self.alive = True
        self.pending: dict[int, Callable[[Any], None]] = {}
        self._ids = 0
        self.on_failure = on_failure

    def send(self, request: tuple[Any, ...], on_reply: Callable[[Any], None]) -> None:
        world = self.net.world
        if not self.alive:
            world.after(0, on_reply, UNREACHABLE)
            return
        self._ids += 1
        rid = self._ids
        self.pending[rid] = on_reply
        world.after(self.deadline, self._expired, rid)
        index = self.store.index
        if index in self.net.partitioned:
            return  # lost on the way; the deadline finds out
        delay = world.latency() + self.net.lag.get(index, 0.0)
        world.after(delay, self._deliver, rid, (request[0], self.session, *request[1:]))

    def _deliver(self, rid: int, request: tuple[Any, ...]) -> None:
        if self.store.index in self.net.partitioned:
            return
        self.store.receive(request, lambda answer: self._answered(rid, answer))

    def _answered(self, rid: int, answer: Any) -> None:
        world = self.net.world
        if self.store.index in self.net.partitioned:
            return
        world.after(world.latency(), self._back, rid, answer)

    def _back(self, rid: int, answer: Any) -> None:
        if self.store.index in self.net.partitioned:
            return
        callback = self.pending.pop(rid, None)
        if callback is not None and self.alive:
            callback(answer)

    def _expired(self, rid: int) -> None:
        callback = self.pending.pop(rid, None)
        if callback is not None and self.alive:
            self.on_failure(self)
            callback(UNREACHABLE)

    def reset(self) -> None:
        """The store's end closed (its process died): the agent hears it now."""
        if self.alive:
            self.on_failure(self)
            self.close()

    def close(self) -> None:
        """The agent gives the connection up: what is pending fails now."""
        if not self.alive:
            return
        self.alive = False
        pending, self.pending = self.pending, {}
        for callback in pending.values():
            self.net.world.after(0, callback, UNREACHABLE)

    def drop(self) -> None:
        """The agent died: nothing comes back, nothing is told."""
        self.alive = False
        self.pending = {}
