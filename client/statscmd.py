"""`netswap stats [URL]`: the dashboard's figures as a terminal table (rich).

Reads /api/stats from a store or a `netswap serve --http` endpoint; --watch
redraws every second with rates computed between samples.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request

from netswap.server.ops.snapshot import Snapshot
from netswap.server.units import read_secret
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

DEFAULT_URL = "http://127.0.0.1:9177/"


class StatsError(Exception):
    """The endpoint could not be read."""


# What `netswap` prints as one line (cli.py).
USER_ERRORS = (StatsError,)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "url",
        nargs="?",
        default=DEFAULT_URL,
        help=f"ops endpoint of a store or `netswap serve --http` ({DEFAULT_URL})",
    )
    parser.add_argument("--token-file", metavar="FILE",
                        help="the endpoint's bearer token (its --http-token-file)")  # fmt: skip
    parser.add_argument("--watch", action="store_true", help="refresh every second")
    parser.add_argument("--count", type=int, default=0, help="with --watch: stop after N refreshes")


def fetch(url: str, token: str = "") -> Snapshot:
    endpoint = url.rstrip("/") + "/api/stats"
    request = urllib.request.Request(endpoint)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return Snapshot.from_json(json.load(response))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise StatsError(f"cannot read {endpoint}: {getattr(exc, 'reason', exc)}") from None
    except (KeyError, TypeError) as exc:
        raise StatsError(f"{endpoint} is not a netswap stats endpoint ({exc!r})") from None


def render(now: Snapshot, prev: Snapshot | None) -> Group:
    figures = Table(title=f"netswap {now.role} v{now.version}", show_header=False)
    figures.add_column("figure")
    figures.add_column("value", justify="right")
    rate = ""
    if prev is not None:
        dt = max(1e-3, now.time - prev.time)
        out = (now.swap_out_pages_total - prev.swap_out_pages_total) / dt
        inn = (now.swap_in_pages_total - prev.swap_in_pages_total) / dt
        rate = f"{out:,.0f} out/s, {inn:,.0f} in/s"
    figures.add_row("pages out / in", f"{now.swap_out_pages_total:,} / {now.swap_in_pages_total:,}")
    if rate:
        figures.add_row("rate", rate)
    for op, q in now.latency_us.items():
        if q:
            figures.add_row(f"{op} latency p50 / p99", f"{q.p50:,.0f} / {q.p99:,.0f} us")
    for op, avg in now.batch_avg_pages.items():
        figures.add_row(f"{op} batch (avg pages)", f"{avg:.1f}")
    if now.reserve:
        r = now.reserve
        figures.add_row("reserve used", f"{r.used_bytes / r.bytes:.0%} of {r.bytes >> 20} MiB")
    p = now.pressure
    figures.add_row("memory PSI some / full", f"{p.some_avg10:.1f} % / {p.full_avg10:.1f} %")
    figures.add_row("replication lag (pages)", str(now.replication_lag_pages))
    kinds = now.swap_out_by_kind
    written = sum(kinds.values())
    if written:  # what pages became on the wire (#31)
        ratio = now.swap_out_payload_bytes / (written * 4096)
        figures.add_row("pages out: filled / compressed / whole",
                        f"{kinds.get('filled', 0):,} / {kinds.get('compressed', 0):,} / "
                        f"{kinds.get('whole', 0):,} ({ratio:.2f} of their bytes sent)")  # fmt: skip
    figures.add_row("checksum errors", str(now.checksum_errors_total))
    if (life := now.lifecycle) is not None:
        started = f"rebuilt {life.rebuild_pages:,} pages" if life.started == "rebuild" else "fresh"
        figures.add_row("agent epoch", f"{life.epoch} ({started})")
        figures.add_row(
            "restarts (last outage)", f"{life.restarts} ({life.last_outage_seconds:.2f} s)"
        )
        unproven = f"[bold red]{life.unproven_slots:,}[/bold red]" if life.unproven_slots else "0"
        figures.add_row("unproven slots (EIO)", unproven)
    stores = Table(title="page stores")
    stores.add_column("store", no_wrap=True)  # an address or "this store": never cut
    for col in ("state", "used MiB", "capacity MiB", "pages", "payload MiB", "slabs", "stale",
                "syncing"):  # fmt: skip
        stores.add_column(col)
    for st in now.stores:
        state = "[green]up[/green]" if st.up else "[bold red]DOWN[/bold red]"
        used, cap = st.used_bytes >> 20, st.capacity_bytes >> 20
        stores.add_row(st.name, state, str(used), str(cap), f"{st.pages:,}",
                       str(st.payload_bytes >> 20), str(st.slabs), str(st.stale),
                       str(st.syncing))  # fmt: skip
    if not now.cluster_nodes:
        return Group(figures, stores)
    nodes = Table(title="cluster nodes")
    for col in ("node", "role", "state", "used MiB", "maxmemory MiB"):
        nodes.add_column(col)
    for n in now.cluster_nodes:
        state = "[green]up[/green]" if n.up else "[bold red]DOWN[/bold red]"
        nodes.add_row(n.name, n.role, state, str(n.used_bytes >> 20),
                      str(n.max_bytes >> 20) if n.max_bytes else "-")  # fmt: skip
    return Group(figures, stores, nodes)


def run(args: argparse.Namespace) -> int:
    console = Console()
    try:
        token = read_secret(args.token_file) if args.token_file else ""
    except (OSError, ValueError) as exc:
        raise StatsError(f"--token-file: {exc}") from None
    first = fetch(args.url, token)
    if not args.watch:
        time.sleep(1)
        console.print(render(fetch(args.url, token), first))
        return 0
    prev, shown = first, 0
    with Live(render(first, None), console=console, refresh_per_second=2) as live:
        while not args.count or shown < args.count:
            time.sleep(1)
            now = fetch(args.url, token)
            live.update(render(now, prev))
            prev, shown = now, shown + 1
    return 0
