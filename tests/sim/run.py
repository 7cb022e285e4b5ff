"""One simulated run per seed: a workload under a nemesis, checked against the promises.

A seed picks everything: the stores (memory, file, Redis), the replicas and
quorum, the area's size, the workload, and the faults -- stalls of any length,
crashes that lose pages or roll them back, clean restarts, partitions,
reordering, refusals with an errno, the agent killed -9 at any step (mid-resync,
mid-rebuild) and restarted on its record, often two at once. Then every fault
heals, the agent is given time, and every slot is read back:

- P1 (safety): every read, during the run and after, is checked by the model.
- P2 (liveness): after healing, a slot whose newest acknowledged page is still on
  a store must read -- unless an agent restart left it unprovable (then EIO is
  the promise: P3).
- P4 (healing): every slab is back to its replicas, all in sync.
- P5 (fencing): no store applied a write of an agent older than one that had
  fenced it.
- P6 (nonces): the model sees every (slot, generation) once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from netswap.client.agent.machine.bounds import READ_WAIT_S, WRITE_WAIT_S
from netswap.client.agent.machine.slots import LOST, UNPROVEN, WRITTEN
from netswap.client.agent.machine.table import IN_SYNC

from .model import Model
from .network import Network
from .shell import IO_TIMEOUT, Config, Keyring, SimAgent
from .stores import SimStore
from .world import World

FAULT_END = 40.0  # faults happen in [1, FAULT_END) simulated seconds
SETTLE_S = 40.0  # after every fault healed: repairs, reconnects, late proofs
OP_GAP_S = 0.08  # mean gap between workload operations (exponential)
IN_FLIGHT = 4  # workload operations at once (each on its own slots)
# The longest an operation may take, by the machine's own bounds (never a hang): a write
# waits for a replica, then for its answer or the deadline that marks its store down;
# a read waits for a store that may hold its page, then for the last one it asks.
BOUND_S = {
    "write": WRITE_WAIT_S + 2 * IO_TIMEOUT + 1,
    "read": READ_WAIT_S + 2 * IO_TIMEOUT + 1,
    "trim": 2 * IO_TIMEOUT + 1,
}  # a discard waits for its store's deadline at most


@dataclass
class Outcome:
    seed: int
    violations: list[str]
    ops: int
    events: int
    cpu: float
    trace: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


class Run:
    def __init__(self, seed: int, trace: bool = False) -> None:
        self.world = world = World(seed, trace)
        rng = world.rng
        n = rng.choice((1, 2, 2, 3, 3, 3))
        kinds = [rng.choice(("memory", "file", "file", "redis")) for _ in range(n)]
        replicas = rng.randint(1, min(n, 3))
        quorum = rng.randint(1, replicas)
        slab = rng.choice((8, 16, 32))
        self.cfg = Config(slab * rng.randint(2, 4), slab, replicas, quorum)
        self.stores = [SimStore(world, i, kind) for i, kind in enumerate(kinds)]
        self.net = Network(world)
        self.keyring = Keyring()
        self.model = Model(self.cfg.slots)
        self.agents = 0
        self.restarted = False
        self.agent = self._new_agent(rebuilding=False)
        self.busy: set[int] = set()
        self.pending: dict[object, tuple[SimAgent, str, float, int]] = {}
        self.hangs: list[str] = []
        self.in_flight = 0
        self.ops = 0
        self.content = 0
        self.faults: list[str] = []
        world.log(f"config {self.cfg} stores {kinds}")

    def _new_agent(self, rebuilding: bool) -> SimAgent:
        self.agents += 1
        agent = SimAgent(self.world, self.net, self.stores, self.cfg, self.keyring, self.model,
                         f"agent{self.agents}", rebuilding)  # fmt: skip
        agent.start()
        return agent

    # -- the workload -------------------------------------------------------------------
    def workload(self, until: float) -> None:
        world = self.world
        if world.now >= until:
            return
        world.after(world.rng.expovariate(1 / OP_GAP_S), self.workload, until)
        if self.in_flight >= IN_FLIGHT or not self.agent.serving:
            return
        rng = world.rng
        roll = rng.random()
        if roll < 0.6:
            self._write()
        elif roll < 0.92:
            self._read(rng.randrange(self.cfg.slots), "during the run")
        elif roll < 0.97:
            self._trim()
        else:
            self._flush()

    def _free_run(self, length: int) -> int:
        rng = self.world.rng
        for _ in range(8):
            first = rng.randrange(self.cfg.slots - length + 1)
            if not any(s in self.busy for s in range(first, first + length)):
                return first
        return -1

    def _hold(self, first: int, count: int, kind: str) -> Callable[[], None]:
        agent = self.agent
        slots = range(first, first + count)
        self.busy.update(slots)
        self.in_flight += 1
        self.ops += 1
        began = self.world.now
        key = object()
        self.pending[key] = (agent, kind, began, first)

        def release() -> None:
            self.pending.pop(key, None)
            took = self.world.now - began
            if took > BOUND_S[kind]:
                self.hangs.append(f"a {kind} of slot {first} took {took:.1f}s (bound "
                                  f"{BOUND_S[kind]:.0f}s)")  # fmt: skip
            if self.agent is agent:
                self.busy.difference_update(slots)
                self.in_flight -= 1

        return release

    def _write(self) -> None:
        count = self.world.rng.choice((1, 1, 2, 3))
        first = self._free_run(count)
        if first < 0:
            return
        release = self._hold(first, count, "write")
        contents = []
        for _ in range(count):
            self.content += 1
            contents.append(self.content)

        def done(error: int) -> None:
            for i, c in enumerate(contents):
                (self.model.acked if not error else self.model.failed)(first + i, c)
            release()

        self.agent.write(first, contents, done)

    def _read(self, slot: int, when: str) -> None:
        if slot in self.busy:
            return
        release = self._hold(slot, 1, "read")

        def done(got: int | None) -> None:
            self.model.read(slot, got, when)
            if got is None and when == "after healing":
                self.eio_after.append(slot)
            release()

        self.agent.read(slot, done)

    def _trim(self) -> None:
        first = self._free_run(2)
        if first < 0:
            return
        release = self._hold(first, 2, "trim")  # as NBD: a write after it, not beside it
        for slot in (first, first + 1):
            self.model.trimmed(slot)
        self.agent.trim(first, 2, release)

    def _flush(self) -> None:
        self.ops += 1
        self.agent.flush()

    # -- the nemesis ---------------------------------------------------------------------
    def nemesis(self) -> None:
        world, rng = self.world, self.world.rng
        count = rng.choice((1, 2, 2, 3, 4))
        for _ in range(count):
            when = rng.uniform(1.0, FAULT_END - 5)
            kind = rng.choice(("stall", "stall", "crash", "crash", "clean", "partition",
                               "lag", "refuse", "agent", "agent"))  # fmt: skip
            target = rng.randrange(len(self.stores))
            length = rng.choice((rng.uniform(0.5, 4), rng.uniform(4, 12), rng.uniform(12, 30)))
            world.at(when, self._fault, kind, target, length)
            if rng.random() < 0.3:  # two at once: another fault right on top of it
                other = rng.choice(("stall", "crash", "agent", "partition"))
                world.at(when + rng.uniform(0, 2), self._fault, other,
                         rng.randrange(len(self.stores)), rng.uniform(0.5, 15))  # fmt: skip

    def _fault(self, kind: str, target: int, length: float) -> None:
        world = self.world
        store = self.stores[target]
        self.faults.append(f"{world.now:.2f} {kind} {store.name} {length:.1f}s")
        world.log(f"NEMESIS {kind} {store.name} for {length:.1f}s")
        end = min(world.now + length, FAULT_END)
        if kind == "stall" and store.alive:
            store.stall()
            world.at(end, store.resume)
        elif kind == "crash" and store.alive:
            store.crash()
            world.at(end, self._restart_store, store)
        elif kind == "clean" and store.alive:
            store.shutdown_clean()
            world.at(end, store.restart_clean)
        elif kind == "partition":
            self.net.partitioned.add(target)
            world.at(end, self.net.partitioned.discard, target)
        elif kind == "lag":
            self.net.lag[target] = min(length, 8.0)
            world.at(end, self.net.lag.pop, target, None)
        elif kind == "refuse":
            store.refuse_until = end
        elif kind == "agent":
            self.agent.kill()
            self.restarted = True
            self.busy.clear()
            self.in_flight = 0
            world.at(world.now + min(length, 3.0), self._restart_agent)

    def _restart_store(self, store: SimStore) -> None:
        if not store.alive:
            store.restart()
            self.world.log(f"store {store.name} restarted (boot {store.boot:x})")

    def _restart_agent(self) -> None:
        if not self.agent.alive:
            self.agent = self._new_agent(rebuilding=True)

    def heal(self) -> None:
        for store in self.stores:
            if store.stalled:
                store.resume()
            if not store.alive:
                self._restart_store(store)
            store.refuse_until = 0.0
        self.net.partitioned.clear()
        self.net.lag.clear()
        if not self.agent.alive:
            self._restart_agent()

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> Outcome:
        began = time.process_time()
        world = self.world
        self.eio_after: list[int] = []
        world.after(0.2, self.workload, FAULT_END + 10)
        self.nemesis()
        world.run_until(FAULT_END)
        self.heal()
        world.run_until(FAULT_END + 10 + SETTLE_S)
        end = world.now
        for slot in range(self.cfg.slots):
            world.at(end + 0.001 * slot, self._read, slot, "after healing")
        world.run_until(end + 10 + 0.001 * self.cfg.slots + 120)
        violations = list(self.model.violations)
        violations += self._liveness() + self._healed() + self._fencing() + self._hung()
        cpu = time.process_time() - began
        return Outcome(world.seed, violations, self.ops, world.events, cpu,
                       world.trace, self.faults)  # fmt: skip

    def _liveness(self) -> list[str]:
        """P2: a slot whose newest acknowledged page is on a store reads, after healing --
        unless a restart left it unprovable (P3 makes that EIO)."""
        out = []
        m = self.agent.m
        for slot in self.eio_after:
            s = self.model.slots[slot]
            if not s.acked or s.trimmed or s.doubt:
                continue
            gen = next((g for (sl, g), c in self.model.nonces.items()
                        if sl == slot and c == s.acked), None)  # fmt: skip
            held = [st.name for st in self.stores if st.area is not None
                    and (p := st.area.pages.get(slot)) and p[0] == gen]  # fmt: skip
            if not held:
                continue  # every copy of it is gone: EIO is the promise
            state = m.slots.state[slot]
            if self.restarted and state in (UNPROVEN, LOST):
                continue  # a restart could not prove it (P3)
            out.append(f"P2: slot {slot} read EIO after healing, its newest page "
                       f"{s.acked} is on {held} (state {state})")  # fmt: skip
        return out

    def _hung(self) -> list[str]:
        """Never a hang: every operation of a live agent ends within its bound."""
        out = [f"hang: {h}" for h in self.hangs]
        now = self.world.now
        for agent, kind, began, first in self.pending.values():
            if agent.alive and now - began > BOUND_S[kind]:
                out.append(f"hang: a {kind} of slot {first} never ended (asked at {began:.1f}s)")
        return out

    def _healed(self) -> list[str]:
        """P4: every slab holding pages has all its replicas, in sync."""
        m = self.agent.m
        table = m.table
        want = min(table.replicas, len(self.stores))
        out = []
        for slab in range(table.slabs):
            span = table.slab_slots(slab)
            if not m.slots.count(WRITTEN, span.start, span.stop):
                continue
            states = [st for _, _, st in table.replicas_of(slab)]
            if len(states) < want or any(st != IN_SYNC for st in states):
                out.append(f"P4: slab {slab} not healed: replicas {table.replicas_of(slab)}")
        return out

    def _fencing(self) -> list[str]:
        """P5: every write a store applied came on a session its agent had fenced (the
        store refuses a session below the area's floor: an older agent's frames)."""
        out = []
        for store in self.stores:
            for slot, gen, epoch in store.applied:
                if not epoch:
                    out.append(f"P5: {store.name} applied slot {slot} gen {gen:#x} "
                               "on a session that never fenced")  # fmt: skip
        return out


def simulate(seed: int, trace: bool = False) -> Outcome:
    return Run(seed, trace).run()
