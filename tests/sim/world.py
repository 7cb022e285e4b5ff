"""The simulated world: one clock, one queue of events, one random source per seed.

Everything the simulator runs -- the agent's machine, its shell, the stores,
the network, the workload and the nemesis -- takes its time and its chance
from here, so one seed gives one trace, event for event (FoundationDB's
simulation, TigerBeetle's VOPR). Nothing here reads the real clock.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

# What a trace keeps: the last events of a run, printed when it fails (the full trace
# of a long seed would drown the few lines that matter; replay one seed for all).
TRACE_KEPT = 400


class World:
    def __init__(self, seed: int, trace: bool = False) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self.events = 0
        self.full_trace = trace
        self.trace: list[str] = []

    def at(self, when: float, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (max(when, self.now), self._seq, fn, args))

    def after(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        self.at(self.now + delay, fn, *args)

    def log(self, text: str) -> None:
        line = f"{self.now:9.3f} {text}"
        self.trace.append(line)
        if not self.full_trace and len(self.trace) > 2 * TRACE_KEPT:
            del self.trace[:-TRACE_KEPT]

    def run_until(self, end: float) -> None:
        queue = self._queue
        while queue and queue[0][0] <= end:
            when, _, fn, args = heapq.heappop(queue)
            self.now = when
            self.events += 1
            fn(*args)
        self.now = max(self.now, end)

    def latency(self) -> float:
        """One way on the simulated network: 50 us to 2 ms, now and then 20 ms."""
        if self.rng.random() < 0.02:
            return 0.02
        return self.rng.uniform(0.00005, 0.002)
