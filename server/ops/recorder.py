"""Fixed-size recorders for figures measured on the swap path.

A Recorder keeps Prometheus-style cumulative bucket counts, a sum and a count,
plus a ring of the last RING samples for exact recent percentiles -- all in
arrays allocated once, so recording allocates nothing and costs a few hundred
nanoseconds. Scrapes and the dashboard read them; the swap path only writes.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Sequence

RING = 1024
# RPC latency buckets (seconds): loopback round trips are ~0.1 ms, a slow store 10+ ms.
LATENCY_BUCKETS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25, 1.0)
# Batch sizes in pages: a kernel request is <= 32 pages, a batch <= 256.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Recorder:
    __slots__ = ("buckets", "count", "counts", "ring", "ring_at", "sum")

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = array("q", [0]) * (len(self.buckets) + 1)  # last: +Inf
        self.ring = array("d", [0.0]) * RING
        self.ring_at = 0
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.buckets, value)] += 1
        self.ring[self.ring_at % RING] = value
        self.ring_at += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs as Prometheus wants them, +Inf last."""
        out, total = [], 0
        for bound, n in zip((*map(str, self.buckets), "+Inf"), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out

    def recent_quantile(self, q: float) -> float | None:
        n = min(self.ring_at, RING)
        if n == 0:
            return None
        ordered = sorted(self.ring[:n])
        return ordered[min(n - 1, int(q * n))]

    @classmethod
    def merged(cls, *parts: Recorder) -> Recorder:
        """One recorder with the samples of several (at scrape time, not on the swap path:
        reads recorded by nbdkit's threads and by the agent's loop are kept apart)."""
        out = cls(parts[0].buckets)
        recent: list[float] = []
        for r in parts:
            for i, n in enumerate(r.counts):
                out.counts[i] += n
            out.count += r.count
            out.sum += r.sum
            recent += r.ring[: min(r.ring_at, RING)]
        for value in recent[-RING:]:
            out.ring[out.ring_at % RING] = value
            out.ring_at += 1
        return out
