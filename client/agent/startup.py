"""How an agent starts: its epoch and record first, then the stores, then (restarted) the rebuild.

Mixed into core.Agent. The epoch goes above every epoch any agent of the area
used -- the record's, the supervisor's, the keyring's and, for a fresh area,
every store's floor -- and is recorded before anything is sealed (P6). Each
store that answers is fenced with it before anything else is sent, and given
this area's life unless it holds it; another host's area is refused before it
is fenced (fencing it would stop that host's writes). A restarted agent waits
for its stores (REBUILD_WAIT_S, then REBUILD_NONE_S with none) and rebuilds
from its record and them (machine/rebuild.py) before it serves.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import secrets

from netswap.protocol import StoreError

from ..rpc import StoreClient
from .driver import Driver
from .keys import AreaKey, KeyringError, RecordKeeper
from .machine.machine import Replicas
from .machine.rebuild import rebuild
from .stores import TRANSPORT_ERRORS, Store

log = logging.getLogger("netswap.agent")

# A rebuilding agent waits this long for every store before it rebuilds from those it
# has (the kernel holds the swap device's IO meanwhile, for up to its dead-connection
# timeout: attach's default is 120 s); a store that comes later proves its slabs then.
REBUILD_WAIT_S = 10.0
# With no store answering at all, a rebuild waits this long more: everything would be
# unproven, while the kernel holds the device's IO and a store may be back in time.
REBUILD_NONE_S = 100.0


class Startup:
    """The agent's start (core.Agent)."""

    area: str
    slots: int
    rebuild: bool
    holder: str
    force: bool
    min_epoch: int
    key: AreaKey | None
    keeper: RecordKeeper | None
    machine: Replicas
    stores: list[Store]
    driver: Driver
    rebuilt_seconds: float
    first_failure: str
    held_elsewhere: str

    def settle(self) -> None: ...

    def _begin(self) -> None:
        """The epoch above every epoch any agent of this area used, recorded before
        anything is sealed (P6); at a restart, the dead agent's record to rebuild from."""
        old = None
        if self.keeper is not None:
            try:
                old = self.keeper.load()
            except (KeyringError, ValueError) as exc:
                if self.rebuild:
                    why = f"the area's record cannot be read: {exc}"
                    raise StoreError(errno.EIO, why) from None
                log.warning("an earlier record of area %s is unreadable (%s): a fresh start "
                            "makes its own", self.area, exc)  # fmt: skip
        if self.rebuild and old is None:
            why = "no keyring" if self.keeper is None else "no record in the keyring"
            raise StoreError(errno.ENOKEY, f"cannot rebuild area {self.area}: {why} (a rebuild"
                             " needs the record the agent keeps there; after a reboot, start"
                             " fresh)")  # fmt: skip
        floor = max(self.min_epoch, self.key.last_epoch() if self.key is not None else 0)
        with self.machine.lock:
            if self.rebuild:
                self.machine.begin(old, floor, 0)
            else:
                floor = max(floor, old.epoch if old is not None else 0)
                self.machine.begin(None, floor, secrets.randbits(63) | 1)
        self.settle()
        if self.key is not None:
            self.key.record_epoch(self.machine.epoch)
        if self.keeper is None:
            log.warning("no kernel keyring here: a restarted agent could not rebuild this area")

    async def _rebuild(self) -> None:
        """Connect to every store that answers within REBUILD_WAIT_S and rebuild the
        dead agent's knowledge from its record and them (machine/rebuild.py)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REBUILD_WAIT_S

        async def reach(store: Store) -> None:
            while not store.up:
                try:
                    await store.connect()
                except (*TRANSPORT_ERRORS, StoreError) as exc:
                    if loop.time() > deadline:
                        log.warning("store %s unreachable for the rebuild: %s", store.name, exc)
                        return
                    await asyncio.sleep(0.2)

        await asyncio.gather(*(reach(store) for store in self.stores))
        if not any(store.up for store in self.stores):
            log.error("no store answers: the rebuild waits up to %.0f s more (the kernel holds "
                      "the device's IO meanwhile)", REBUILD_NONE_S)  # fmt: skip
            deadline = loop.time() + REBUILD_NONE_S
            await asyncio.gather(*(reach(store) for store in self.stores))
            if not any(store.up for store in self.stores):
                raise ConnectionError(
                    f"no store answered within {REBUILD_WAIT_S + REBUILD_NONE_S:.0f}s"
                    ": this agent cannot rebuild the area"
                )
        began = loop.time()
        done = asyncio.Event()
        self.driver.start(rebuild(self.machine), done.set)
        await done.wait()
        self.rebuilt_seconds = loop.time() - began
        log.warning("%s", self.rebuild_summary())

    def rebuild_summary(self) -> str:
        m = self.machine
        left = m.unreadable()
        away = [s.name for s in self.stores if not s.up]
        parts = [f"rebuilt the area from the stores in {self.rebuilt_seconds:.1f}s: "
                 f"{m.counters['rebuild_pages']} pages proven, epoch {m.epoch}"]  # fmt: skip
        behind = m.replicas_behind()
        if behind:
            parts.append(f"{behind} replicas not in sync (a resync copies what they lack)")
        if left["unproven"]:
            parts.append(f"{left['unproven']} slots unproven (they wait for "
                         f"{', '.join(away) or 'their stores'})")  # fmt: skip
        if left["lost"]:
            parts.append(f"{left['lost']} slots lost")
        return "; ".join(parts)

    async def _first_connect(self, store: Store) -> None:
        try:
            await store.connect()
        except (*TRANSPORT_ERRORS, StoreError) as exc:
            log.warning("store %s unavailable at start: %s", store.name, exc)
            self.first_failure = self.first_failure or str(exc)
            if isinstance(exc, StoreError) and exc.errno == errno.EEXIST:
                self.held_elsewhere = exc.reason

    async def activate(self, store: Store, client: StoreClient) -> bool:
        """A store answered Hello: fence it with this agent's epoch, and make sure it holds
        this area's life (a store that lost the area, or holds an earlier life of it, gets
        this one). True when it kept the area. Another host's area is refused here, before
        anything is sent: fencing it would stop that host's writes."""
        welcome = client.welcome
        assert welcome is not None
        m = self.machine
        ours = m.record.area_id
        kept = welcome.area_id == ours and welcome.area_slots > 0
        theirs = welcome.holder and welcome.holder != self.holder and not kept
        if theirs and not (self.force and not self.rebuild):
            raise StoreError(errno.EEXIST, f"area {self.area} is held by {welcome.holder} "
                             f"on {store.name}")  # fmt: skip
        if welcome.floor >= m.epoch and welcome.floor > store.fenced and not self.rebuild:
            # A fresh area after its record went (detach, a reboot): a store's floor
            # outlives the area, so this agent goes above it, recorded before it fences.
            # Not above a floor it set itself (a store back after a stall, a file store
            # restarted): its other connections, fenced at its epoch, would be refused.
            with m.lock:
                m.raise_epoch(welcome.floor + 1)
            self.settle()
            if self.key is not None:
                self.key.record_epoch(m.epoch)
        try:
            await client.fence(m.epoch)
            store.fenced = max(store.fenced, m.epoch)
        except StoreError as exc:
            if exc.errno == errno.ESTALE:
                with m.lock:
                    m.fenced(store.index, f"store {store.name}: {exc.reason}")
                self.settle()
            raise
        if not kept:
            force = self.force and not self.rebuild
            await client.swapfile(True, self.slots, area_id=ours, holder=self.holder, force=force)
        return kept
