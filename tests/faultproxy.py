"""A TCP proxy between agents and one store that reads the agents' frames: it holds
chosen connections' frames and delivers them later (a dead agent's frames on their
way, a segment retransmitted late), stalls a connection at its first frame of a kind
(a store stuck on one request), or drops everything (a partition). The store's answers
pass as they come. Only the frame length and type are read, which 6afe607's protocol
shares: the tests that use it run against that agent too.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable

from .conftest import free_port
from .procs import StoreProc

LENGTH = struct.Struct(">I")  # every frame: a 4-byte big-endian length, then its body


class Link:
    """One agent connection through the proxy: the agent's socket and the store's."""

    def __init__(self, agent: socket.socket, store: socket.socket) -> None:
        self.agent, self.store = agent, store
        self.held: list[bytes] = []  # frames kept from the store, in order
        self.hold: frozenset[int] = frozenset()  # frame types to keep (and all after one)
        self.cut = False  # a frame of a type in Proxy.cut_on went by: nothing more passes
        self.agent_gone = False
        self.lock = threading.Lock()


class Proxy:
    """A TCP proxy in front of one store, reading the agent's frames (the store's answers
    pass as they are). It can keep an agent's frames from the store and deliver them
    later -- a dead agent's frames still on their way, a segment retransmitted late --
    or stop a connection for good at the first frame of a kind (the store stalls on it)."""

    def __init__(self, store: StoreProc) -> None:
        self.store = store
        self.port = free_port()
        self.links: list[Link] = []
        self.cut_on: frozenset[int] = frozenset()  # a connection sending one of these stalls
        self.cuts = 0  # connections stalled so far
        self.max_cuts = 1
        self.partitioned = False  # every frame of every connection is dropped, for good
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def hold(self, *types: int, links: list[Link] | None = None) -> None:
        """From now on, keep the frames of these types (and every later frame) that these
        connections (default: those open now) send."""
        for link in self.links if links is None else links:
            link.hold |= frozenset(types)

    def held(self, links: list[Link] | None = None) -> int:
        return sum(len(link.held) for link in (self.links if links is None else links))

    def release(self, links: list[Link] | None = None) -> None:
        """Deliver the kept frames of these connections (default: all), in order; those
        whose agent is gone end."""
        for link in list(self.links) if links is None else links:
            with link.lock:
                frames, link.held, link.hold = link.held, [], frozenset()
                for frame in frames:
                    link.store.sendall(frame)
                if link.agent_gone:
                    link.store.shutdown(socket.SHUT_WR)

    def partition(self) -> None:
        """The store is cut off: nothing of any connection reaches it (nor its answers the
        agent) until heal(); the connections cut stay dead, new ones after heal() pass."""
        self.partitioned = True
        for link in self.links:
            link.cut = True

    def heal(self) -> None:
        self.partitioned = False

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for link in self.links:
            for s in (link.agent, link.store):
                s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                agent, _ = self._listener.accept()
                store = socket.create_connection(("127.0.0.1", self.store.port))
            except OSError:
                return
            link = Link(agent, store)
            self.links.append(link)
            threading.Thread(target=self._to_store, args=(link,), daemon=True).start()
            threading.Thread(target=self._to_agent, args=(link,), daemon=True).start()

    def _to_agent(self, link: Link) -> None:
        try:
            while data := link.store.recv(1 << 16):
                if not link.cut:
                    link.agent.sendall(data)
        except OSError:
            pass
        if not link.cut:
            _quietly(link.agent.shutdown, socket.SHUT_WR)

    def _to_store(self, link: Link) -> None:
        buf, first = b"", True
        try:
            while data := link.agent.recv(1 << 16):
                buf += data
                while len(buf) >= 4 and len(buf) >= 4 + LENGTH.unpack_from(buf)[0]:
                    end = 4 + LENGTH.unpack_from(buf)[0]
                    frame, buf = buf[:end], buf[end:]
                    kind = -1 if first else frame[4]  # the handshake is msgpack: no head
                    first = False
                    self._pass(link, kind, frame)
        except OSError:
            pass
        with link.lock:
            link.agent_gone = True
            if not link.held and not link.hold and not link.cut:
                _quietly(link.store.shutdown, socket.SHUT_WR)

    def _pass(self, link: Link, kind: int, frame: bytes) -> None:
        if self.partitioned:
            link.cut = True
        if kind in self.cut_on and self.cuts < self.max_cuts and not link.cut:
            link.cut = True
            self.cuts += 1
        if link.cut:
            return
        with link.lock:
            if link.held or kind in link.hold:
                link.held.append(frame)
            else:
                link.store.sendall(frame)


def _quietly(fn: Callable[[int], None], how: int) -> None:
    with contextlib.suppress(OSError):
        fn(how)
