"""The agent's stats snapshot: what its /api/stats, /metrics and dashboard show.

Built on the agent's own loop when scraped, from counters and recorders the
swap path writes into preallocated arrays; nothing here runs per request.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from netswap.protocol import PAGE_SIZE
from netswap.server.ops.recorder import Recorder
from netswap.server.ops.snapshot import (
    ClusterNode,
    Lifecycle,
    RecentDecision,
    ReserveFigures,
    Snapshot,
    StoreRow,
)
from netswap.server.ops.sources import Source, empty, histogram, quantiles_us

from .core import Agent
from .direct import DirectPath
from .fills import PayloadFigures
from .machine.slots import UNPROVEN
from .machine.table import STALE, SUSPECT, SYNCING
from .policy import REASONS

# Recent decisions the dashboard lists; the agent keeps a ring of 50.
RECENT_SHOWN = 20

# Where the supervisor that started this nbdkit keeps its state (restarts, outages).
SUPERVISOR_STATE_ENV = "NETSWAP_SUPERVISOR_STATE"


def agent_source(
    agent: Agent,
    local_reads: Callable[[], int],
    direct: DirectPath | None = None,
    payloads: PayloadFigures | None = None,
) -> Source:
    """local_reads: pages the device served itself (reserve copies, zeros); direct: the
    swap-ins and lone swap-outs done on nbdkit's threads, merged into the swap_in and
    swap_out figures."""

    def snapshot() -> Snapshot:
        c = agent.counters
        reserve = agent.reserve
        now = time.monotonic()
        latency, batches = dict(agent.rpc_latency), dict(agent.batch_sizes)
        in_direct = out_direct = 0
        if direct is not None:
            for op, figures in (("swap_in", direct.read_figures),
                                ("swap_out", direct.write_figures)):  # fmt: skip
                latency[op] = Recorder.merged(latency[op], figures.latency)
                batches[op] = Recorder.merged(batches[op], figures.batches)
            in_direct, out_direct = direct.read_figures.pages, direct.write_figures.pages
        by_path = {"direct": in_direct, "loop": c["swap_in_pages"], "local": local_reads()}
        out_by_path = {"direct": out_direct, "loop": c["swap_out_pages"]}
        return replace(
            empty("agent"),
            swap_out_pages_total=sum(out_by_path.values()),
            swap_in_pages_total=sum(by_path.values()),
            swap_in_by_path=by_path,
            swap_out_by_path=out_by_path,
            checksum_errors_total=c["checksum_errors"],
            histograms={
                "rpc_duration_seconds": [histogram(op, r) for op, r in latency.items()],
                "batch_pages": [histogram(op, r) for op, r in batches.items()],
            },
            latency_us={op: quantiles_us(r) for op, r in latency.items()},
            batch_avg_pages={
                op: (r.sum / r.count if r.count else 0.0) for op, r in batches.items()
            },
            reserve=ReserveFigures(reserve.pages * PAGE_SIZE, reserve.used * PAGE_SIZE),
            stores=store_rows(agent),
            replication_lag_pages=agent.machine.lag(),
            # Every reason from the start, at 0: series exist before the first batch.
            decisions={r: agent.decisions.get(r, 0) for r in (*REASONS, "linger")},
            recent_decisions=[
                RecentDecision(round(now - t, 2), r, n)
                for t, r, n in list(agent.recent_decisions)[-RECENT_SHOWN:]
            ],
            lifecycle=lifecycle(agent),
            cluster_nodes=cluster_nodes(agent),
            cluster_counters=cluster_counters(agent),
            swap_out_by_kind=dict(payloads.kinds) if payloads is not None else {},
            swap_out_payload_bytes=payloads.payload_bytes if payloads is not None else 0,
        )

    return snapshot


def store_rows(agent: Agent) -> list[StoreRow]:
    """One row per store for the dashboard: health, usage, slabs by state."""
    machine = agent.machine
    rows = []
    for store in agent.stores:
        states = machine.replica_states(store.index)
        rows.append(
            StoreRow(
                name=store.name,
                up=store.up,
                used_bytes=store.used_bytes,
                capacity_bytes=store.capacity_bytes,
                slabs=len(states),
                stale=sum(1 for st in states if st in (STALE, SUSPECT)),
                syncing=sum(1 for st in states if st == SYNCING),
                failures=store.counters["failures"],
                reconnects=store.counters["reconnects"],
            )
        )
    return rows


def cluster_nodes(agent: Agent) -> list[ClusterNode]:
    """On a cluster tier, its nodes as the last usage refresh saw them."""
    client = agent.stores[0].client if agent.stores else None
    figures = getattr(client, "node_figures", None)  # cluster/client.py, not imported here
    if not figures:
        return []
    return [ClusterNode(f.name, f.role, f.up, f.used_bytes, f.max_bytes) for f in figures]


def cluster_counters(agent: Agent) -> dict[str, int]:
    client = agent.stores[0].client if agent.stores else None
    return dict(client.counters) if hasattr(client, "node_figures") else {}  # type: ignore[union-attr]


def lifecycle(agent: Agent) -> Lifecycle:
    """The agent's start and the supervisor's restarts (its state file, when one started
    this nbdkit). Counting UNPROVEN slots walks the state bytes once: at a scrape only."""
    supervised: dict[str, object] = {}
    path = os.environ.get(SUPERVISOR_STATE_ENV)
    if path:
        # The supervisor replaces the file whole; unreadable (stopped): shown as none.
        with contextlib.suppress(OSError, ValueError):
            supervised = json.loads(Path(path).read_text())
    counters = agent.machine.counters
    restarts, outage = supervised.get("restarts", 0), supervised.get("last_outage_s", 0.0)
    return Lifecycle(
        epoch=agent.machine.epoch,
        started="rebuild" if agent.rebuild else "fresh",
        restarts=restarts if isinstance(restarts, int) else 0,
        last_outage_seconds=float(outage) if isinstance(outage, (int, float)) else 0.0,
        last_reason=str(supervised.get("last_reason", "")),
        rebuild_pages=counters["rebuild_pages"],
        rebuild_seconds=round(agent.rebuilt_seconds, 3),
        unproven_slots=agent.machine.slots.state.count(UNPROVEN),
    )
