"""The typed stats snapshot every netswap process serves.

One frozen dataclass of typed sections is what `/api/stats` serialises,
what `/metrics` renders and what `netswap stats` reads back: the store, the
agent and an embedded export each fill one (`sources.py`, and the agent's own
source on the host side), so the three readers cannot drift apart. The JSON
shape is the dataclass's fields, one to one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

VERSION = "0.1.0"


@dataclass(frozen=True)
class Histogram:
    """Prometheus-style cumulative buckets of one recorder, for one op."""

    op: str
    buckets: list[tuple[str, int]]
    sum: float
    count: int


@dataclass(frozen=True)
class Quantiles:
    """Recent p50/p99 of a latency recorder, in microseconds."""

    p50: float
    p99: float


@dataclass(frozen=True)
class ReserveFigures:
    bytes: int
    used_bytes: int


@dataclass(frozen=True)
class StoreRow:
    """One page store as seen by whoever serves the snapshot."""

    name: str
    up: bool
    used_bytes: int  # capacity in use: whole pages, zspages, what a flush will free
    capacity_bytes: int
    pages: int = 0  # payloads held (each stands for a page swapped out)
    payload_bytes: int = 0  # their bytes: used_bytes / payload_bytes is what they cost
    slabs: int = 0
    stale: int = 0
    syncing: int = 0
    failures: int = 0
    reconnects: int = 0


@dataclass(frozen=True)
class PressureFigures:
    """PSI avg10 (percent), MemAvailable and the summed low watermarks (KiB)."""

    some_avg10: float
    full_avg10: float
    mem_available_kb: int
    watermark_low_kb: int


@dataclass(frozen=True)
class HostSwap:
    """The host's cumulative swap counters from /proc/vmstat."""

    pswpin: int = 0
    pswpout: int = 0


@dataclass(frozen=True)
class RecentDecision:
    age_s: float
    reason: str
    pages: int


@dataclass(frozen=True)
class ClusterNode:
    """Agents on a cluster tier: one Redis node, from CLUSTER NODES and INFO memory."""

    name: str
    role: str  # "master" or "replica"
    up: bool
    used_bytes: int
    max_bytes: int


@dataclass(frozen=True)
class Lifecycle:
    """Agents: how this agent started and what the supervisor has seen (restarts)."""

    epoch: int = 0  # generations this agent writes are above every earlier agent's
    started: str = "fresh"  # or "rebuild": from the stores, after an agent died
    restarts: int = 0  # agents the supervisor has started after the first
    last_outage_seconds: float = 0.0  # the device's IO held at the last restart
    last_reason: str = ""
    rebuild_pages: int = 0  # pages this agent's rebuild found and proved
    rebuild_seconds: float = 0.0
    unproven_slots: int = 0  # now: slots that read EIO until a missing store returns


@dataclass(frozen=True)
class Snapshot:
    role: str  # "store", "agent" or "embedded"
    time: float
    pressure: PressureFigures
    host: HostSwap
    version: str = VERSION
    swap_out_pages_total: int = 0
    swap_in_pages_total: int = 0
    # agents: which path served the swap-ins -- "direct" (nbdkit's thread to a store),
    # "loop" (through the agent's loop), "local" (the reserve, or zeros)
    swap_in_by_path: dict[str, int] = field(default_factory=dict)
    # agents: "direct" (a lone write sent by nbdkit's thread) or "loop" (batched)
    swap_out_by_path: dict[str, int] = field(default_factory=dict)
    checksum_errors_total: int = 0
    histograms: dict[str, list[Histogram]] = field(default_factory=dict)
    latency_us: dict[str, Quantiles | None] = field(default_factory=dict)
    batch_avg_pages: dict[str, float] = field(default_factory=dict)
    reserve: ReserveFigures | None = None
    stores: list[StoreRow] = field(default_factory=list)
    replication_lag_pages: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    recent_decisions: list[RecentDecision] = field(default_factory=list)
    connections: int | None = None  # stores only: connections accepted
    lifecycle: Lifecycle | None = None  # agents only
    cluster_nodes: list[ClusterNode] = field(default_factory=list)  # agents on a cluster
    cluster_counters: dict[str, int] = field(default_factory=dict)
    # agents: pages written by what they became on the wire (#31) -- "filled" (same-
    # filled: an 8-byte word), "compressed" (lz4, in 256-B granules), "whole" -- and the
    # bytes those payloads came to
    swap_out_by_kind: dict[str, int] = field(default_factory=dict)
    swap_out_payload_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.connections is None:
            del out["connections"]
        if self.lifecycle is None:
            del out["lifecycle"]
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Snapshot:
        """Read /api/stats back (`netswap stats`); a missing section is a KeyError."""
        return cls(
            role=raw["role"],
            version=raw["version"],
            time=raw["time"],
            pressure=PressureFigures(**raw["pressure"]),
            host=HostSwap(**raw["host"]),
            swap_out_pages_total=raw["swap_out_pages_total"],
            swap_in_pages_total=raw["swap_in_pages_total"],
            swap_in_by_path=dict(raw.get("swap_in_by_path", {})),
            swap_out_by_path=dict(raw.get("swap_out_by_path", {})),
            checksum_errors_total=raw["checksum_errors_total"],
            histograms={
                name: [
                    Histogram(h["op"], [tuple(b) for b in h["buckets"]], h["sum"], h["count"])
                    for h in hists
                ]
                for name, hists in raw["histograms"].items()
            },
            latency_us={op: Quantiles(**q) if q else None for op, q in raw["latency_us"].items()},
            batch_avg_pages=dict(raw["batch_avg_pages"]),
            reserve=ReserveFigures(**raw["reserve"]) if raw["reserve"] else None,
            stores=[StoreRow(**row) for row in raw["stores"]],
            replication_lag_pages=raw["replication_lag_pages"],
            decisions=dict(raw["decisions"]),
            recent_decisions=[RecentDecision(**d) for d in raw["recent_decisions"]],
            connections=raw.get("connections"),
            lifecycle=Lifecycle(**raw["lifecycle"]) if raw.get("lifecycle") else None,
            cluster_nodes=[ClusterNode(**n) for n in raw.get("cluster_nodes", [])],
            cluster_counters=dict(raw.get("cluster_counters", {})),
            swap_out_by_kind=dict(raw.get("swap_out_by_kind", {})),
            swap_out_payload_bytes=raw.get("swap_out_payload_bytes", 0),
        )
