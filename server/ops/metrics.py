"""Prometheus exposition of a stats snapshot (the same one /api/stats serves).

One source of truth: every role (store, agent, embedded export) produces one
typed Snapshot; this module turns it into metric families at scrape time, so the
swap path never touches anything here. Names follow Prometheus conventions:
`_total` counters, base units (seconds, bytes), `_info`-style build gauge.

The text format (version 0.0.4) is written here, not by prometheus-client: in
the agent this runs inside nbdkit, where every touched page is locked, and that
import cost ~4 MiB for a few dozen lines of output.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from .snapshot import Lifecycle, ReserveFigures, Snapshot


def _value(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    esc = (v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in values)
    pairs = sorted(zip(names, esc, strict=True))  # in name order, as prometheus-client
    return "{" + ",".join(f'{n}="{v}"' for n, v in pairs) + "}"


class Metric:
    """One family: its HELP and TYPE lines, then its samples."""

    kind = "untyped"
    suffix = ""

    def __init__(self, name: str, doc: str, value: float | None = None,
                 labels: Sequence[str] = ()) -> None:  # fmt: skip
        self.name, self.doc, self.labels = name + self.suffix, doc, tuple(labels)
        self.samples: list[str] = []
        if value is not None:
            self.samples.append(f"{self.name} {_value(value)}")

    def add_metric(self, values: Sequence[str], value: float) -> None:
        self.samples.append(f"{self.name}{_labels(self.labels, values)} {_value(value)}")

    def text(self) -> str:
        doc = self.doc.replace("\\", "\\\\").replace("\n", "\\n")
        return "".join(
            [f"# HELP {self.name} {doc}\n# TYPE {self.name} {self.kind}\n"]
            + [s + "\n" for s in self.samples]
        )


class GaugeMetricFamily(Metric):
    kind = "gauge"


class CounterMetricFamily(Metric):
    kind, suffix = "counter", "_total"


class HistogramMetricFamily(Metric):
    kind = "histogram"

    def add_metric(  # type: ignore[override]
        self, values: Sequence[str], buckets: Sequence[tuple[str, float]], sum_value: float
    ) -> None:
        names = (*self.labels, "le")
        for le, count in buckets:
            self.samples.append(
                f"{self.name}_bucket{_labels(names, (*values, le))} {_value(count)}"
            )
        count = buckets[-1][1] if buckets else 0
        self.samples.append(f"{self.name}_count{_labels(self.labels, values)} {_value(count)}")
        self.samples.append(f"{self.name}_sum{_labels(self.labels, values)} {_value(sum_value)}")


class _SnapshotCollector:
    def __init__(self, snapshot: Snapshot) -> None:
        self.s = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.s
        build = GaugeMetricFamily(
            "netswap_build_info", "netswap version and role", labels=["version", "role"]
        )
        build.add_metric([s.version, s.role], 1)
        yield build
        yield CounterMetricFamily(
            "netswap_swap_out_pages", "Pages swapped out", value=s.swap_out_pages_total
        )
        yield CounterMetricFamily(
            "netswap_swap_in_pages", "Pages swapped in", value=s.swap_in_pages_total
        )
        for way, paths in (("in", s.swap_in_by_path), ("out", s.swap_out_by_path)):
            by_path = CounterMetricFamily(
                f"netswap_swap_{way}_pages_by_path",
                f"Pages swapped {way}, by the path that served them",
                labels=["path"],
            )
            for path, n in sorted(paths.items()):
                by_path.add_metric([path], n)
            yield by_path
        if s.role == "agent":  # what pages became on the wire (#31)
            kinds = CounterMetricFamily(
                "netswap_swap_out_pages_by_kind",
                "Pages swapped out, by their payload: filled (an 8-byte word), compressed, whole",
                labels=["kind"],
            )
            for kind in ("filled", "compressed", "whole"):
                kinds.add_metric([kind], s.swap_out_by_kind.get(kind, 0))
            yield kinds
            yield CounterMetricFamily(
                "netswap_swap_out_payload_bytes",
                "Bytes the pages swapped out came to on the wire (sealed: plus 16 B each)",
                value=s.swap_out_payload_bytes,
            )
        yield CounterMetricFamily(
            "netswap_checksum_errors", "Page checksum mismatches", value=s.checksum_errors_total
        )
        for name, doc in (
            ("rpc_duration_seconds", "Round trip of one swap_out/swap_in RPC"),
            ("batch_pages", "Pages per swap_out/swap_in batch"),
        ):
            hist = HistogramMetricFamily(f"netswap_{name}", doc, labels=["op"])
            for h in s.histograms.get(name, []):
                hist.add_metric([h.op], h.buckets, h.sum)
            yield hist
        reserve = s.reserve or ReserveFigures(0, 0)
        yield GaugeMetricFamily("netswap_reserve_bytes", "Swap-out reserve size", reserve.bytes)
        yield GaugeMetricFamily(
            "netswap_reserve_used_bytes", "Reserve bytes holding pages", reserve.used_bytes
        )
        up = GaugeMetricFamily(
            "netswap_store_up", "1 if the page store is reachable", labels=["store"]
        )
        used = GaugeMetricFamily(
            "netswap_store_used_bytes", "Bytes of capacity in use", labels=["store"]
        )
        cap = GaugeMetricFamily("netswap_store_capacity_bytes", "Store capacity", labels=["store"])
        held = GaugeMetricFamily(
            "netswap_store_pages", "Payloads held (a page swapped out each)", labels=["store"]
        )
        payload = GaugeMetricFamily(
            "netswap_store_payload_bytes", "Bytes of the payloads held", labels=["store"]
        )
        failures = CounterMetricFamily(
            "netswap_store_failures", "Times the store was marked down", labels=["store"]
        )
        reconnects = CounterMetricFamily(
            "netswap_store_reconnects", "Times the store came back", labels=["store"]
        )
        for st in s.stores:
            up.add_metric([st.name], 1 if st.up else 0)
            used.add_metric([st.name], st.used_bytes)
            cap.add_metric([st.name], st.capacity_bytes)
            held.add_metric([st.name], st.pages)
            payload.add_metric([st.name], st.payload_bytes)
            failures.add_metric([st.name], st.failures)
            reconnects.add_metric([st.name], st.reconnects)
        yield from (up, used, cap, held, payload, failures, reconnects)
        yield GaugeMetricFamily(
            "netswap_replication_lag_pages",
            "Written pages whose slab has a replica not in sync",
            s.replication_lag_pages,
        )
        if s.lifecycle is not None:
            yield from _lifecycle(s.lifecycle)
        if s.cluster_nodes:
            yield from _cluster(s)
        decisions = CounterMetricFamily(
            "netswap_batch_decisions", "Batching decisions by reason", labels=["reason"]
        )
        for reason, n in sorted(s.decisions.items()):
            decisions.add_metric([reason], n)
        yield decisions
        p = s.pressure
        yield GaugeMetricFamily(
            "netswap_host_memory_pressure_some_ratio",
            "PSI memory some avg10, as a ratio",
            p.some_avg10 / 100,
        )
        yield GaugeMetricFamily(
            "netswap_host_memory_pressure_full_ratio",
            "PSI memory full avg10, as a ratio",
            p.full_avg10 / 100,
        )
        yield GaugeMetricFamily(
            "netswap_host_memory_available_bytes", "MemAvailable", p.mem_available_kb * 1024
        )
        yield GaugeMetricFamily(
            "netswap_host_watermark_low_bytes",
            "Sum of zone low watermarks",
            p.watermark_low_kb * 1024,
        )
        host = s.host
        yield CounterMetricFamily("netswap_host_swap_in_pages", "Host pswpin", value=host.pswpin)
        yield CounterMetricFamily("netswap_host_swap_out_pages", "Host pswpout", value=host.pswpout)


def _lifecycle(life: Lifecycle) -> Iterator[Metric]:
    yield GaugeMetricFamily("netswap_agent_epoch", "The agent's generation epoch", life.epoch)
    yield CounterMetricFamily(
        "netswap_agent_restarts", "Agents the supervisor started after the first", life.restarts
    )
    yield GaugeMetricFamily(
        "netswap_agent_last_outage_seconds",
        "How long the device's IO was held at the last agent restart",
        life.last_outage_seconds,
    )
    yield GaugeMetricFamily(
        "netswap_agent_rebuild_pages", "Pages this agent's rebuild proved", life.rebuild_pages
    )
    yield GaugeMetricFamily(
        "netswap_agent_unproven_slots",
        "Slots that read EIO until a store away at the rebuild returns",
        life.unproven_slots,
    )


def _cluster(s: Snapshot) -> Iterator[Metric]:
    up = GaugeMetricFamily("netswap_cluster_node_up", "1 if the cluster node answers",
                           labels=["node", "role"])  # fmt: skip
    used = GaugeMetricFamily("netswap_cluster_node_used_bytes", "The node's used_memory",
                             labels=["node", "role"])  # fmt: skip
    cap = GaugeMetricFamily("netswap_cluster_node_max_bytes", "The node's maxmemory (0: none)",
                            labels=["node", "role"])  # fmt: skip
    for n in s.cluster_nodes:
        up.add_metric([n.name, n.role], 1 if n.up else 0)
        used.add_metric([n.name, n.role], n.used_bytes)
        cap.add_metric([n.name, n.role], n.max_bytes)
    yield from (up, used, cap)
    for name, value in sorted(s.cluster_counters.items()):
        yield CounterMetricFamily(f"netswap_cluster_{name}", f"Cluster tier: {name}", value=value)


def render(snapshot: Snapshot) -> bytes:
    return "".join(m.text() for m in _SnapshotCollector(snapshot).collect()).encode()
