"""Stats snapshots for each role: page store, agent, embedded export.

A snapshot is a plain dict (the /api/stats body, and the only input of the
Prometheus exposition). Building one reads counters and recorders; it never
blocks the swap path and is cheap enough to take every second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from netswap.client.policy import REASONS

from .backends import PageBackend
from .hoststats import host_snapshot
from .recorder import Recorder

if TYPE_CHECKING:
    from netswap.client.agent import Agent

    from .service import StoreService

VERSION = "0.1.0"
PAGE = 4096
Source = Callable[[], dict[str, Any]]


def histogram(op: str, rec: Recorder) -> dict[str, Any]:
    return {"op": op, "buckets": rec.cumulative(), "sum": rec.sum, "count": rec.count}


def quantiles_us(rec: Recorder) -> dict[str, float] | None:
    p50, p99 = rec.recent_quantile(0.5), rec.recent_quantile(0.99)
    if p50 is None or p99 is None:
        return None
    return {"p50": p50 * 1e6, "p99": p99 * 1e6}


def base(role: str) -> dict[str, Any]:
    return {
        "role": role,
        "version": VERSION,
        "time": time.time(),
        "swap_out_pages_total": 0,
        "swap_in_pages_total": 0,
        "checksum_errors_total": 0,
        "histograms": {},
        "latency_us": {},
        "batch_avg_pages": {},
        "reserve": None,
        "stores": [],
        "replication_lag_pages": 0,
        "decisions": {},
        "recent_decisions": [],
        **host_snapshot(),
    }


def backend_source(backend: PageBackend, role: str = "embedded") -> Source:
    def snapshot() -> dict[str, Any]:
        s = base(role)
        c = backend.counters
        s["swap_out_pages_total"] = c["pages_written"]
        s["swap_in_pages_total"] = c["pages_read"]
        s["checksum_errors_total"] = c["checksum_errors"]
        s["stores"] = [{
            "name": f"{backend.kind} (embedded)", "up": True,
            "used_bytes": backend.used_pages * PAGE,
            "capacity_bytes": backend.capacity_pages * PAGE,
            "slabs": 0, "stale": 0, "syncing": 0, "failures": 0, "reconnects": 0,
        }]  # fmt: skip
        return s

    return snapshot


def store_source(service: StoreService) -> Source:
    inner = backend_source(service.backend, "store")

    def snapshot() -> dict[str, Any]:
        s = inner()
        s["stores"][0]["name"] = "this store"
        recs = service.recorders
        s["histograms"] = {
            "rpc_duration_seconds": [histogram(op, r) for op, r in recs["latency"].items()],
            "batch_pages": [histogram(op, r) for op, r in recs["batch"].items()],
        }
        s["latency_us"] = {op: quantiles_us(r) for op, r in recs["latency"].items()}
        s["connections"] = service.counters["connections"]
        return s

    return snapshot


def agent_source(agent: Agent, local_reads: Callable[[], int]) -> Source:
    def snapshot() -> dict[str, Any]:
        s = base("agent")
        c = agent.counters
        s["swap_out_pages_total"] = c["swap_out_pages"]
        s["swap_in_pages_total"] = c["swap_in_pages"] + local_reads()
        s["checksum_errors_total"] = c["checksum_errors"]
        s["histograms"] = {
            "rpc_duration_seconds": [histogram(op, r) for op, r in agent.rpc_latency.items()],
            "batch_pages": [histogram(op, r) for op, r in agent.batch_sizes.items()],
        }
        s["latency_us"] = {op: quantiles_us(r) for op, r in agent.rpc_latency.items()}
        s["batch_avg_pages"] = {
            op: (r.sum / r.count if r.count else 0.0) for op, r in agent.batch_sizes.items()
        }
        reserve = agent.reserve
        s["reserve"] = {"bytes": reserve.pages * PAGE, "used_bytes": reserve.used * PAGE}
        s["stores"] = agent.store_table()
        s["replication_lag_pages"] = agent.replication_lag()
        # Every reason from the start, at 0: series exist before the first batch.
        s["decisions"] = {r: agent.decisions.get(r, 0) for r in (*REASONS, "linger")}
        s["recent_decisions"] = [
            {"age_s": round(time.monotonic() - t, 2), "reason": r, "pages": n}
            for t, r, n in list(agent.recent_decisions)[-20:]
        ]
        return s

    return snapshot
