"""Stats snapshots of the roles that live on this side: page store, embedded export.

A source is a function that builds one `Snapshot` (the /api/stats body, and
the only input of the Prometheus exposition). Building one reads counters and
recorders; it never blocks the swap path and is cheap enough to take every
second. The agent's source is built the same way on the host side
(`netswap.client.agent.stats`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from ..backends import PageBackend
from .hoststats import host_figures
from .recorder import Recorder
from .snapshot import Histogram, Quantiles, Snapshot, StoreRow

if TYPE_CHECKING:
    from ..service import StoreService

Source = Callable[[], Snapshot]


def histogram(op: str, rec: Recorder) -> Histogram:
    return Histogram(op, rec.cumulative(), rec.sum, rec.count)


def quantiles_us(rec: Recorder) -> Quantiles | None:
    p50, p99 = rec.recent_quantile(0.5), rec.recent_quantile(0.99)
    if p50 is None or p99 is None:
        return None
    return Quantiles(p50 * 1e6, p99 * 1e6)


def empty(role: str) -> Snapshot:
    """A snapshot with the host's figures and every counter at zero."""
    pressure, host = host_figures()
    return Snapshot(role=role, time=time.time(), pressure=pressure, host=host)


def backend_source(backend: PageBackend, role: str = "embedded") -> Source:
    def snapshot() -> Snapshot:
        c = backend.counters
        row = StoreRow(
            name=f"{backend.kind} (embedded)",
            up=True,
            used_bytes=backend.used_bytes,
            capacity_bytes=backend.capacity_bytes,
            pages=backend.used_pages,
            payload_bytes=backend.payload_bytes,
        )
        return replace(
            empty(role),
            swap_out_pages_total=c["pages_written"],
            swap_in_pages_total=c["pages_read"],
            checksum_errors_total=c["checksum_errors"],
            stores=[row],
        )

    return snapshot


def store_source(service: StoreService) -> Source:
    inner = backend_source(service.backend, "store")

    def snapshot() -> Snapshot:
        s = inner()
        recs = service.recorders
        return replace(
            s,
            stores=[replace(s.stores[0], name="this store")],
            histograms={
                "rpc_duration_seconds": [histogram(op, r) for op, r in recs["latency"].items()],
                "batch_pages": [histogram(op, r) for op, r in recs["batch"].items()],
            },
            latency_us={op: quantiles_us(r) for op, r in recs["latency"].items()},
            connections=service.counters["connections"],
        )

    return snapshot
