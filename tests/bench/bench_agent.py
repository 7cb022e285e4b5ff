"""make bench-agent: fio through plugin -> agent -> page store(s) on loopback.

Same run, same client (fio ioengine=nbd), alternating between:
  agent            netswap serve --backend remote, every default (one store)
  agent-plain      the same with --no-encrypt: pages in plaintext (the cost of
                   sealing every page, #24)
  agent-spread     the same with --cpus all: threads where the kernel puts them,
                   not gathered on one CPU
  agent-loop       --reads loop --writes loop: every swap-in and lone swap-out
                   through the agent's loop thread
  agent-unbatched  --batch-pages 1: one page per RPC
  agent-2x         two stores, --replicas 2
  agent-cluster    the cluster tier (#25): a Redis cluster of 3 masters and 3
                   replicas (redis-server here), each write WAITing for 1 replica
  agent-writeback  --cache writeback (acknowledged from the reserve)
  agent-tls        against a TLS store (--store-tls-ca)
  agent-raw        --compress off: every page whole (#31); fio's buffers are
                   random bytes, so agent/raw is the cost of trying lz4 on
                   incompressible pages at every row
  agent-corpus     with a corpus (`make corpus`): the content rows of
  agent-corpus-raw content.py, corpus and zero pages, lz4 against off (#31)
  agent-before     with --baseline VENV: that venv's netswap (another checkout,
                   e.g. the last release) against its own store, so a change is
                   measured against what it replaces in the same run
  nbdkit-memory    the peer
  py-parallel      floor: a PARALLEL Python plugin doing one copy per request
  py-handoff       floor: the same plus the agent's hand-off to an event-loop
                   thread that completes each request at once (no agent work,
                   no network): the loop design's ceiling
  py-combine       floor: no loop thread; requests combine into batches, the
                   first thread in making one raw 4 KiB round trip to an echo
                   process per batch (#12's combining design, no agent work)
  py-rpc           floor: one raw round trip per request on its thread's own
                   connection (the direct path's shape, no agent work)
Prints IOPS, pages/s, p50/p99, and the ratios the issues track: the agent
against the best floor of the same run (by IOPS; by p50 at QD1), 2 replicas
and unbatched against the agent, against nbdkit-memory and against
agent-before. With --chart PNG it draws the agent, the floors and
nbdkit-memory per workload (matplotlib). --cpus LIST pins every Python
server there (serve --cpus, taskset for the floors); nbdkit-memory, a C
server without a GIL, runs as it likes.

Then targets.py: #31's and #29's targets, each against its peer in this run,
with its noise and the CPU per page that holds it. Issue 31 and 29's rows in
about 9 minutes (agent, agent-raw, agent-before and the corpus rows):
  make bench-agent BENCH_ARGS="--servers agent,agent-raw,agent-before
                               --baseline ../base/.venv --rounds 5 --runtime 2"
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from functools import partial
from pathlib import Path

from netswap.lab.cluster import cluster

from ..conftest import free_port
from ..corpus.generate import DEFAULT_DIR, read_manifest
from ..pki import make_pki
from ..procs import StoreProc
from . import targets
from .bench_nbd import BEHIND, floor_cmd, measured, netswap_cmd, peer_cmd, server
from .content import Content
from .fio import Result, Workload, fio, prefill

SIZE = "256M"
LAST = Path(".cache/bench-agent-last.json")  # every run's figures, for --report
PAGES = 256 << 20 >> 12  # what the prefill writes
# 4 KiB is the worst case; 64-128 KiB at depth is what the kernel's swap-out
# sends (writes merge to ~18-20 pages, at most 32).
WORKLOADS = (
    Workload("4K randread QD1", "randread", "4k", 1),
    Workload("4K randwrite QD1", "randwrite", "4k", 1),
    Workload("4K randwrite QD32", "randwrite", "4k", 32),
    Workload("4K randread QD32", "randread", "4k", 32),
    Workload("64K randwrite QD32", "randwrite", "64k", 32),
    Workload("128K randwrite QD8", "randwrite", "128k", 8),
)
FLOORS = ("py-handoff", "py-combine", "py-rpc")
COLORS = {"agent": "tab:red", "agent-before": "tab:orange", "nbdkit-memory": "tab:gray"}
Medians = dict[str, dict[str, tuple[float, float, float]]]  # server -> workload -> figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runtime", type=float, default=4)
    parser.add_argument("--cpus", help="pin the Python servers to these CPUs")
    parser.add_argument("--sched", default="normal", help="the agents' scheduling policy")
    parser.add_argument("--only", default="", help="workloads whose name contains this")
    parser.add_argument("--servers", default="", help="only these servers (comma list)")
    parser.add_argument("--baseline", help="a venv whose netswap is agent-before")
    parser.add_argument("--chart", help="draw the agent against the floors into this PNG")
    parser.add_argument("--content", choices=("auto", "on", "off"), default="auto",
                        help="the corpus rows (auto: when .cache/corpus/ exists)")  # fmt: skip
    parser.add_argument("--replay-procs", type=int, default=1,
                        help="processes writing corpus pages (replay.py)")  # fmt: skip
    parser.add_argument("--report", type=Path, help=f"print a saved run's targets (see {LAST})")
    args = parser.parse_args()
    if args.report:
        try:
            saved = targets.load(args.report)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            parser.error(f"--report {args.report}: not a saved run ({exc})")
        targets.report(*saved)
        return
    corpus = bool(read_manifest(DEFAULT_DIR))
    if args.content == "on" and not corpus:
        parser.error(f"--content on: no corpus in {DEFAULT_DIR}: run `make corpus` (as root)")
    workloads = [w for w in WORKLOADS if args.only in w.name]
    wanted = set(args.servers.split(",")) if args.servers else set()
    with ExitStack() as stack:
        commands, stores = server_commands(stack, args, wanted)
        if wanted:
            commands = {k: v for k, v in commands.items() if k in wanted}
        uris = {}
        for name, command in commands.items():
            port = free_port()
            uris[name] = stack.enter_context(server(command(port), port))
            if name in stores:  # one store behind this server alone (in turn, for s1)
                BEHIND[uris[name]] = stores[name]
        for uri in uris.values():
            prefill(uri, SIZE)
        rows = None
        if corpus and args.content != "off":
            rows = Content(stack, pin(args), args.runtime, args.replay_procs)
            rows.prefill()
        results: dict[str, dict[str, list[Result]]] = {name: {} for name in uris}
        load = [os.getloadavg()[0]]
        for n in range(args.rounds):
            order = list(uris.items())[:: -1 if n % 2 else 1]  # neither side always first
            for work in workloads:
                for name, uri in order:
                    run = partial(fio, uri, work, SIZE, args.runtime)
                    results[name].setdefault(work.name, []).append(measured(uri, run, args.runtime))
            if rows is not None:
                rows.round(results, reverse=bool(n % 2))
            load.append(os.getloadavg()[0])
        if rows is not None:
            rows.finish()
    placement = f"Python servers on CPU {args.cpus}" if args.cpus else "default placement"
    loads = "load average (1 min) at the start and after each round: " + " ".join(
        f"{x:.1f}" for x in load
    )
    medians = report(results, workloads, args.rounds,
                     f"{placement}, agents --sched {args.sched}; {loads}")  # fmt: skip
    figures = rows.figures if rows is not None else {}
    targets.save(LAST, results, workloads, figures)
    targets.report(results, workloads, figures)
    if args.chart:
        chart(medians, workloads, Path(args.chart))
        print(f"chart: {args.chart}")


def pin(args: argparse.Namespace) -> list[str]:
    """What every agent gets of --cpus and --sched."""
    return [*(["--cpus", args.cpus] if args.cpus else []), "--sched", args.sched]


def median_of(runs: list[Result]) -> tuple[float, float, float]:
    med = statistics.median
    return med(r.iops for r in runs), med(r.p50_us for r in runs), med(r.p99_us for r in runs)


def server_commands(
    stack: ExitStack, args: argparse.Namespace, wanted: set[str]
) -> tuple[dict[str, Callable[[int], list[str]]], dict[str, int]]:
    """Every server's command, and the pid of the one store behind each agent that
    has one (the agents on s1 take turns on it); the stores and the cluster are
    started only for the servers wanted (none: all)."""

    def want(name: str) -> bool:
        return not wanted or name in wanted

    def store(capacity: str, *extra: str) -> StoreProc:
        s = StoreProc(capacity, extra).start()
        stack.callback(s.kill)
        return s

    s1 = store("2G")  # seven agents of 256 MiB each share it
    pin_args = pin(args)
    taskset = ["taskset", "-c", args.cpus] if args.cpus else []
    one = ["--backend", "remote", "--store", s1.address, *pin_args]

    def agent(area: str, *extra: str) -> Callable[[int], list[str]]:
        return lambda port: netswap_cmd(port, [*one, "--area", area, *extra])

    commands: dict[str, Callable[[int], list[str]]] = {
        "agent": agent("bench1"),
        "agent-plain": agent("bench1p", "--no-encrypt"),
        "agent-spread": agent("bench1s", "--cpus", "all"),
        "agent-loop": agent("bench1l", "--reads", "loop", "--writes", "loop"),
        "agent-unbatched": agent("bench1u", "--batch-pages", "1"),
        "agent-writeback": agent("bench1w", "--cache", "writeback"),
        "agent-raw": agent("bench1r", "--compress", "off"),
    }
    behind = dict.fromkeys(commands, s1.pid)  # these take turns on s1
    if want("agent-2x"):
        s2, s3 = store("1G"), store("1G")
        two = ["--backend", "remote", "--store", s2.address, "--store", s3.address,
               "--replicas", "2", "--area", "bench2", *pin_args]  # fmt: skip
        commands["agent-2x"] = lambda port: netswap_cmd(port, two)
    if want("agent-cluster"):
        redis = stack.enter_context(cluster(3, 1, maxmemory="1gb"))
        empty = redis.used_memory()

        def per_page() -> None:
            held = (redis.used_memory() - empty) / PAGES
            print(f"cluster memory per stored page: {held:,.0f} B, {held / 4096:.3f}x a page "
                  "(the masters' used_memory after the prefill and the run, less the empty "
                  "cluster's)")  # fmt: skip

        stack.callback(per_page)
        commands["agent-cluster"] = lambda port: netswap_cmd(
            port, ["--backend", "remote", "--cluster", redis.url, "--area", "bench1c", *pin_args]
        )
    if want("agent-tls"):
        pki = make_pki(Path(stack.enter_context(tempfile.TemporaryDirectory())))
        s4 = store("1G", "--tls-cert", str(pki.store_cert), "--tls-key", str(pki.store_key))
        tls_one = ["--backend", "remote", "--store", s4.address, "--store-tls-ca", str(pki.ca),
                   "--area", "bench1t", *pin_args]  # fmt: skip
        commands["agent-tls"] = lambda port: netswap_cmd(port, tls_one)
        behind["agent-tls"] = s4.pid
    if args.baseline and want("agent-before"):
        venv = Path(args.baseline)
        old = StoreProc("1G", netswap=str(venv / "bin" / "netswap")).start()
        stack.callback(old.kill)
        behind["agent-before"] = old.pid
        commands["agent-before"] = lambda port: netswap_cmd(
            port,
            ["--backend", "remote", "--store", old.address, "--area", "bench0", *pin_args],
            netswap=str(venv / "bin" / "netswap"),
        )
    commands.update({
        "nbdkit-memory": peer_cmd,
        "py-parallel": lambda port: [*taskset, *floor_cmd(port, "model=parallel")],
        "py-handoff": lambda port: [*taskset, *floor_cmd(port, "model=parallel", "handoff=1")],
        "py-combine": lambda port: [*taskset,
                                    *floor_cmd(port, "model=parallel", "handoff=combine")],
        "py-rpc": lambda port: [*taskset, *floor_cmd(port, "model=parallel", "handoff=rpc")],
    })  # fmt: skip
    return commands, behind


def report(
    results: dict[str, dict[str, list[Result]]],
    workloads: list[Workload],
    rounds: int,
    placement: str,
) -> Medians:
    print(
        f"fio ioengine=nbd, {SIZE} prefilled, medians of {rounds} alternating rounds, {placement}"
    )
    print(f"{'workload':<20}{'server':<17}{'IOPS':>10}{'pages/s':>10}{'p50 us':>9}{'p99 us':>9}")
    medians: Medians = {}
    for work in workloads:
        pages = int(work.bs.rstrip("k")) // 4
        med = {name: median_of(runs[work.name]) for name, runs in results.items()
               if work.name in runs}  # fmt: skip
        for name, (iops, p50, p99) in med.items():
            medians.setdefault(name, {})[work.name] = (iops, p50, p99)
            print(f"{work.name:<20}{name:<17}{iops:>10,.0f}{iops * pages:>10,.0f}"
                  f"{p50:>9.1f}{p99:>9.1f}")  # fmt: skip
        print(f"{'':<20}" + ", ".join(f"{k} {v:.2f}x" for k, v in ratios(med, work).items()))
    return medians


def ratios(med: Mapping[str, tuple[float, ...]], work: Workload) -> dict[str, float]:
    """What the issues track, for the servers this run has."""
    out: dict[str, float] = {}
    agent = med.get("agent")
    floors = [f for f in FLOORS if f in med]
    if agent is None:
        return out
    if floors:
        best = max(floors, key=lambda f: med[f][0])
        out[f"agent/best floor ({best})"] = agent[0] / med[best][0]
        if work.iodepth == 1:
            fastest = min(floors, key=lambda f: med[f][1])
            out[f"p50 agent/best floor ({fastest})"] = agent[1] / med[fastest][1]
    if "agent-cluster" in med:  # #25: at least 0.8x netswap's own store
        out["cluster/agent"] = med["agent-cluster"][0] / agent[0]
        if work.iodepth == 1:
            out["p50 cluster/agent"] = med["agent-cluster"][1] / agent[1]
    for name, label in (("agent-2x", "2 replicas/agent"), ("agent-unbatched", "agent/unbatched"),
                        ("agent-plain", "agent/plain"), ("agent-raw", "agent/compress off"),
                        ("agent-before", "agent/before"), ("agent-spread", "agent/spread"),
                        ("agent-loop", "agent/loop"), ("nbdkit-memory", "agent/nbdkit-memory"),
                        ("py-parallel", "agent/py-parallel")):  # fmt: skip
        if name in med:
            other = med[name][0]
            out[label] = (other / agent[0]) if name == "agent-2x" else agent[0] / other
    if "agent-raw" in med and "agent-before" in med:  # #29: the machine, like for like
        out["compress off/before"] = med["agent-raw"][0] / med["agent-before"][0]
    if "agent-before" in med and work.iodepth == 1:
        out["p50 agent/before"] = agent[1] / med["agent-before"][1]
    if "agent-plain" in med and work.iodepth == 1:  # #24: at most 10 us added at 4K QD1
        out["p50 us sealed-plain"] = agent[1] - med["agent-plain"][1]
    return out


def chart(medians: Medians, workloads: list[Workload], path: Path) -> None:
    """Pages/s per workload, one bar per server, and the agent's ratio to the best floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [s for s in ("agent", "agent-before", *FLOORS, "py-parallel", "nbdkit-memory")
             if s in medians]  # fmt: skip
    fig, axes = plt.subplots(1, len(workloads), figsize=(3.2 * len(workloads), 4.6))
    for ax, work in zip([axes] if len(workloads) == 1 else axes, workloads, strict=True):
        pages = int(work.bs.rstrip("k")) // 4
        values = [medians[s][work.name][0] * pages / 1000 for s in shown]
        colors = [COLORS.get(s, "tab:blue") for s in shown]
        ax.bar(range(len(shown)), values, color=colors)
        ax.set_xticks(range(len(shown)), shown, rotation=60, ha="right", fontsize=8)
        ax.set_title(work.name, fontsize=9)
        ax.set_ylabel("thousand pages/s" if ax is axes[0] or len(workloads) == 1 else "")
        floors = [medians[f][work.name][0] for f in FLOORS if f in medians]
        if floors and "agent" in medians:
            ratio = medians["agent"][work.name][0] / max(floors)
            ax.text(0.02, 0.97, f"agent / best floor {ratio:.2f}x", transform=ax.transAxes,
                    va="top", fontsize=8)  # fmt: skip
    fig.suptitle("make bench-agent: the agent against its floors (fio ioengine=nbd, loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
