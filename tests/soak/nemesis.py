"""The soak's nemesis: one fault at a time, in turn, each ended and repaired before the next.

The faults (issue #29: ordinary faults cost time, never a page):
  stall-one     one store SIGSTOPped 1..max_stall s (a GC pause, a migration), then resumed
  kill          a memory store killed -9 (its pages gone), started again DOWN_S later
  file-restart  the file store killed -9 and started again on its directory: back at its
                last flush, every later write of it lost (a rollback)
  stall-all     every store SIGSTOPped 1..max_stall s at once, then resumed
  agent         a store SIGSTOPped (away), the agent killed -9 and started again with
                --start rebuild (what the supervisor does), the store resumed once the new
                agent serves -- two faults at once, the kind two replicas must survive
A fault begins once the last one is repaired (the agent reports every store up and no
replication lag) and `every_s` after the last began: two faults of stores at once
would be a second failure, which two replicas do not promise to survive.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..faultkit import AgentProc
from ..procs import StoreProc

KINDS = ("stall-one", "kill", "file-restart", "stall-all", "agent")
DOWN_S = 5.0  # a killed memory store stays down this long
REPAIR_S = 120.0  # a repair taking longer ends the nemesis (the soak reports what waits)


@dataclass
class Fault:
    kind: str
    began: float  # seconds into the run
    seconds: float  # how long the fault lasted
    repair_s: float = -1.0  # from its end to every slab in sync again (-1: not yet)


@dataclass
class Nemesis:
    stores: list[StoreProc]  # memory stores first; the last is the file store
    restart_agent: Callable[[], AgentProc]  # kill -9 the agent, start it again (rebuild)
    unhealthy: Callable[[], str]  # "" once repaired, else what is not
    max_stall: float = 30.0
    every_s: float = 30.0
    first_s: float = 15.0
    seed: int = 29
    kinds: tuple[str, ...] = KINDS  # taken in turn
    faults: list[Fault] = field(default_factory=list)
    restarts: int = 0  # agent restarts begun (the workload reconnects after each)
    waiting: str = ""  # what the last fault's repair still waited for at the end
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _began: float = 0.0

    def start(self) -> None:
        self._began = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the fault under way (every store resumed and running) and stop."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(REPAIR_S)

    def _sleep(self, seconds: float) -> bool:
        return not self._stop.wait(seconds)

    def _run(self) -> None:
        rng = random.Random(self.seed)
        next_at = self._began + self.first_s
        turn = 0
        while self._sleep(max(0.0, next_at - time.monotonic())):
            kind = self.kinds[turn % len(self.kinds)]
            turn += 1
            began = time.monotonic()
            fault = Fault(kind, began - self._began, 0.0)
            self.faults.append(fault)
            getattr(self, "_" + kind.replace("-", "_"))(rng)
            ended = time.monotonic()
            fault.seconds = ended - began
            while (waiting := self.unhealthy()) and not self._stop.is_set():
                if time.monotonic() - ended > REPAIR_S:
                    self.waiting = waiting
                    return
                self._stop.wait(0.5)
            if waiting:  # stopped before the repair
                self.waiting = waiting
                return
            fault.repair_s = time.monotonic() - ended
            next_at = max(began + self.every_s, time.monotonic() + 2.0)

    # -- the faults ------------------------------------------------------------------
    def _stall(self, stores: list[StoreProc], seconds: float) -> None:
        for s in stores:
            _signal(s, signal.SIGSTOP)
        try:
            self._sleep(seconds)
        finally:
            for s in stores:
                _signal(s, signal.SIGCONT)

    def _stall_one(self, rng: random.Random) -> None:
        self._stall([rng.choice(self.stores)], rng.uniform(1.0, self.max_stall))

    def _stall_all(self, rng: random.Random) -> None:
        self._stall(self.stores, rng.uniform(1.0, self.max_stall))

    def _kill(self, rng: random.Random) -> None:
        store = rng.choice(self.stores[:-1])
        store.kill()
        try:
            self._sleep(DOWN_S)
        finally:
            store.start()

    def _file_restart(self, rng: random.Random) -> None:
        store = self.stores[-1]
        store.kill()
        store.start()

    def _agent(self, rng: random.Random) -> None:
        away = rng.choice(self.stores)
        _signal(away, signal.SIGSTOP)
        try:
            self.restarts += 1  # before the kill: a request failing from now is the restart's
            self.restart_agent()
        finally:
            _signal(away, signal.SIGCONT)


def _signal(store: StoreProc, sig: int) -> None:
    if store.proc is not None:
        os.kill(store.proc.pid, sig)
