"""`make soak`: the agent and three stores under a verified workload for ten minutes,
with stores killed (-9) and restarted on a schedule (one store at a time: the
next kill waits until the agent reports the last one repaired).

Every second it samples RSS, open fds and threads of the agent (nbdkit with the
plugin) and of each store. Every page the workload wrote is checked when read
back. It passes when no page is wrong or lost, and the agent's RSS after the
warm-up grows slower than SLOPE_BOUND_MIB per ten minutes (least squares over
the samples; reported either way). The RSS chart goes to artifacts/soak-rss.png
(matplotlib). With --trace, the agent runs under tracemalloc and the report
names where its Python memory grew between the end of the warm-up and the end
of the run: its allocation sites (ops endpoint /debug/allocations), diffed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import nbd
from netswap.client.statscmd import StatsError, fetch
from netswap.lab.ports import free_port

from ..procs import StoreProc, agent_log, agent_serve

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
# A store is down this long in every KILL_EVERY_S; with 3 stores and 2 replicas one
# down at a time never loses a page (the others hold a copy, resync refills it). The
# next kill waits until the last restart is repaired: a kill before that would be a
# second failure, which two replicas do not promise to survive.
KILL_EVERY_S, DOWN_S = 30.0, 5.0
# The first kill comes early: the 90-s slice of make test then sees two even when a
# repair takes a minute (seen in CI, beside a guest: one kill in 90 s).
FIRST_KILL_S = 15.0
# The first stretch fills the reserve, the slab table and the stores' arenas.
WARMUP_FRACTION = 0.3
# The bar for the long runs (#22: 0.1 MiB per 10 min, an hour long); the short slice
# in make test uses a looser one, since a minute of samples cannot resolve it.
SLOPE_BOUND_MIB = 0.1
# Frames per allocation tracemalloc keeps with --trace: the site and its caller.
TRACE_FRAMES = 2
# Allocation sites the report names (largest growth first).
GROWTH_SHOWN = 12
# What the agent logs when a resync read pages from an in-sync replica that did not
# prove themselves (repair.py): never expected. Seen before 23bfee4, when a resync's
# pages were read after the connection's buffer had moved on: 31-208 per 90 s run.
UNPROVEN_RESYNC = re.compile(r"resync of slab \d+ failed: slots .* are not their own pages")


@dataclass
class Samples:
    t: list[float] = field(default_factory=list)
    by_name: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)  # rss, fds, thr

    def add(self, t: float, name: str, pid: int | None) -> None:
        self.by_name.setdefault(name, []).append(proc_figures(pid) if pid else (0, 0, 0))


def unhealthy(url: str) -> str:
    """Why the agent is not yet repaired ("" once every store is up and no slab has a
    replica out of sync: the agent's own figures)."""
    try:
        snap = fetch(url)
    except StatsError as exc:
        return str(exc)
    down = [s.name for s in snap.stores if not s.up]
    if down or snap.replication_lag_pages:
        slabs = ", ".join(f"{s.name}: {s.stale} stale {s.syncing} syncing {s.failures} failures"
                          for s in snap.stores)  # fmt: skip
        return f"{snap.replication_lag_pages} pages of replication lag, down {down}; {slabs}"
    return ""


def proc_figures(pid: int) -> tuple[int, int, int]:
    """(RSS KiB, open fds, threads) of a live process; zeros if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        fields = {k: v.split()[0] for k, _, v in (x.partition(":") for x in status) if v.split()}
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return int(fields["VmRSS"]), fds, int(fields["Threads"])
    except (OSError, KeyError, ValueError):
        return 0, 0, 0


def slope_mib_per_10min(t: list[float], rss_kib: list[int]) -> float:
    n = len(t)
    if n < 2:
        return 0.0
    mt, mr = sum(t) / n, sum(rss_kib) / n
    var = sum((x - mt) ** 2 for x in t)
    cov = sum((x - mt) * (y - mr) for x, y in zip(t, rss_kib, strict=True))
    return cov / var / 1024 * 600 if var else 0.0


def verified_workload(uri: str, stop: threading.Event, errors: list[str],
                      checked: list[int]) -> list[threading.Thread]:  # fmt: skip
    """Two writers of whole 8-page blocks, each reading back a random earlier block."""

    def worker(n: int) -> None:
        rng = random.Random(n)
        h = nbd.NBD()
        h.connect_uri(uri)
        blocks = h.get_size() // 4096 // 8 // 2
        truth: dict[int, bytes] = {}
        while not stop.is_set():
            block = n * blocks + rng.randrange(blocks)
            data = rng.randbytes(8 * 4096)
            try:
                h.pwrite(data, block * 8 * 4096)
                truth[block] = data
                probe = rng.choice(list(truth))
                if h.pread(8 * 4096, probe * 8 * 4096) != truth[probe]:
                    errors.append(f"block {probe} read back wrong")
                checked[0] += 8
            except nbd.Error as exc:
                errors.append(f"block {block}: {exc}")
                return
        h.shutdown()

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(2)]
    for t in threads:
        t.start()
    return threads


@dataclass
class Outcome:
    seconds: float
    errors: list[str]
    pages_checked: int
    kills: int
    slope: float
    peaks: dict[str, tuple[int, int, int]]
    chart: Path
    repairs: list[float]
    waiting: str = ""  # what kept the next kill waiting at the end, if anything did
    unproven_resyncs: int = 0  # resyncs whose in-sync source did not prove its pages
    growth: list[tuple[str, int]] = field(default_factory=list)  # (site, bytes) grown
    traced_growth: int = 0  # bytes of Python memory grown, by tracemalloc


def allocation_sites(http: str) -> tuple[int, dict[str, int]]:
    """The agent's traced bytes and bytes by allocation site, now."""
    with urllib.request.urlopen(f"http://{http}/debug/allocations", timeout=60) as r:
        body = json.loads(r.read())
    return body["traced_bytes"], {s["where"]: s["bytes"] for s in body["sites"]}


def soak(seconds: float, chart: Path, replicas: int = 2, trace: bool = False) -> Outcome:
    samples, errors, checked, kills = Samples(), [], [0], 0
    repairs: list[float] = []  # seconds from a store's restart to every slab in sync
    warm_sites: tuple[int, dict[str, int]] | None = None
    growth: list[tuple[str, int]] = []
    traced_growth = 0
    with ExitStack() as stack:
        stores = [StoreProc("256M").start() for _ in range(3)]
        for s in stores:
            stack.callback(s.kill)
        http = f"127.0.0.1:{free_port()}"
        env = {"NETSWAP_TRACEMALLOC": str(TRACE_FRAMES)} if trace else {}
        uri, agent = stack.enter_context(
            agent_serve(stores, "256M", "--replicas", str(replicas), "--http", http, env=env)
        )
        stop = threading.Event()
        threads = verified_workload(uri, stop, errors, checked)
        began = time.monotonic()
        next_kill, down, back, waiting = began + FIRST_KILL_S, None, None, ""
        while (now := time.monotonic()) - began < seconds and not errors:
            if back is not None:
                waiting = unhealthy(f"http://{http}/")  # "" from the repair on
                if not waiting:
                    repairs.append(now - back)
                    back = None
            if down is None and back is None and now >= next_kill:
                down = stores[kills % len(stores)]
                down.kill()
                kills += 1
            elif down is not None and now >= next_kill + DOWN_S:
                down.start()
                down, back, next_kill = None, now, next_kill + KILL_EVERY_S
            if trace and warm_sites is None and now - began >= seconds * WARMUP_FRACTION:
                warm_sites = allocation_sites(http)
            samples.t.append(now - began)
            samples.add(now, "agent", agent.pid)
            for i, s in enumerate(stores):
                samples.add(now, f"store{i + 1}", s.proc.pid if s.proc else None)
            time.sleep(1.0)
        stop.set()
        for t in threads:
            t.join(30)
        if trace and warm_sites is not None:
            traced, sites = allocation_sites(http)
            traced_growth = traced - warm_sites[0]
            before = warm_sites[1]
            grown = {w: b - before.get(w, 0) for w, b in sites.items()}
            growth = sorted(grown.items(), key=lambda item: -item[1])[:GROWTH_SHOWN]
    log = agent_log(int(uri.rsplit(":", 1)[1].split("/")[0]))
    unproven = len(UNPROVEN_RESYNC.findall(log.read_text(errors="replace")))
    agent_rss = [r for r, _, _ in samples.by_name["agent"]]
    warm = int(len(samples.t) * WARMUP_FRACTION)
    slope = slope_mib_per_10min(samples.t[warm:], agent_rss[warm:])
    draw(chart, samples, warm, slope)
    peaks = {name: tuple(max(f[i] for f in figs) for i in range(3))
             for name, figs in samples.by_name.items()}  # fmt: skip
    return Outcome(samples.t[-1] if samples.t else 0, errors, checked[0], kills, slope,
                   peaks, chart, repairs, waiting, unproven, growth,
                   traced_growth)  # type: ignore[arg-type]  # fmt: skip


def draw(chart: Path, samples: Samples, warm: int, slope: float) -> None:
    """RSS of the agent and each store over the run, the warm-up shaded, the agent's
    fitted slope in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, figures in samples.by_name.items():
        label = f"{name} (after warm-up {slope:+.2f} MiB/10 min)" if name == "agent" else name
        ax.plot(samples.t, [f[0] / 1024 for f in figures], label=label,
                linewidth=1.6 if name == "agent" else 1.0)  # fmt: skip
    if samples.t and warm:
        ax.axvspan(0, samples.t[warm], color="0.9", label="warm-up")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("resident memory, RSS (MiB)")
    ax.set_title("make soak: RSS of the agent (nbdkit + plugin) and the stores, stores killed -9")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    chart.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(chart, dpi=110)


def report(out: Outcome) -> None:
    print(f"soak: {out.seconds:.0f}s, {out.kills} store kills, {out.pages_checked} pages "
          f"verified, {len(out.errors)} errors; agent RSS slope after warm-up "
          f"{out.slope:+.2f} MiB per 10 min (bound {SLOPE_BOUND_MIB})")  # fmt: skip
    if out.repairs:
        print(f"  repairs: {len(out.repairs)}, each from a store's restart to every slab in "
              f"sync again: median {sorted(out.repairs)[len(out.repairs) // 2]:.1f}s, "
              f"max {max(out.repairs):.1f}s")  # fmt: skip
    if out.waiting:
        print(f"  the last restart was not repaired {out.seconds:.0f}s in: {out.waiting}")
    print(f"  resyncs whose in-sync source did not prove its pages: {out.unproven_resyncs}")
    for name, (rss, fds, threads) in out.peaks.items():
        print(f"  {name:<7} peak RSS {rss / 1024:6.1f} MiB, fds {fds:4d}, threads {threads:3d}")
    print(f"  RSS chart: {out.chart}")
    if out.growth:
        print(f"  agent's Python memory after warm-up: {out.traced_growth / 1024:+.1f} KiB "
              "(tracemalloc); the sites that grew most:")  # fmt: skip
        for where, grown in out.growth:
            print(f"    {grown / 1024:+9.1f} KiB  {where}")
    for error in out.errors[:5]:
        print(f"  ERROR {error}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="make soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--chart", type=Path, default=ARTIFACTS / "soak-rss.png")
    parser.add_argument("--replicas", type=int, default=2, help="1: shows the check failing")
    parser.add_argument("--trace", action="store_true", help="name where memory grew (tracemalloc)")
    args = parser.parse_args()
    out = soak(args.seconds, args.chart, args.replicas, args.trace)
    report(out)
    ok = (not out.errors and out.pages_checked and out.slope < SLOPE_BOUND_MIB
          and not out.unproven_resyncs)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
