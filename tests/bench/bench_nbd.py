"""make bench-nbd: fio against `netswap serve` and `nbdkit memory`, same run, same client.

All servers are nbdkit processes on loopback with the same flags (no --swap,
default threads), both exports are prefilled, and the workloads alternate
between them for ROUNDS rounds so drift on this shared machine hits both
alike. Prints IOPS and p50/p99 completion latency per server and the ratios
netswap / nbdkit-memory (medians over rounds).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import sysconfig
import threading
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from ..conftest import free_port, wait_for_port
from .fio import RAMP_S, WORKLOADS, Result, fio, prefill

SIZE = "256M"
PIDS: dict[str, int] = {}  # a served URI -> its server's pid (for tree_cpu)
BEHIND: dict[str, int] = {}  # a served URI -> the pid of the one store behind it, if any
_TICK = os.sysconf("SC_CLK_TCK")


@contextmanager
def server(cmd: list[str], port: int) -> Iterator[str]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        uri = f"nbd://127.0.0.1:{port}/swap"
        PIDS[uri] = proc.pid
        yield uri
    finally:
        proc.terminate()
        proc.wait()


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its descendants alive now:
    a server's nbdkit, its plugin's threads and whatever it started."""
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, seconds)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
    tree, grown = {pid}, True
    while grown:  # pids wrap, so a child's may be lower than its parent's
        more = {child for child, (parent, _) in stats.items() if parent in tree}
        grown = not more <= tree
        tree |= more
    return sum(stats[p][1] for p in tree if p in stats)


def measured(uri: str, run: Callable[[], Result], runtime: float) -> Result:
    """run()'s result with its server's CPU per request (and its store's, when
    BEHIND names one): the CPU over the run, ramp included, over the requests the
    run's rate makes in that time."""
    pids = [PIDS[uri], *([BEHIND[uri]] if uri in BEHIND else [])]
    before = [tree_cpu(p) for p in pids]
    res = run()
    spent = [tree_cpu(p) - b for p, b in zip(pids, before, strict=True)]
    done = res.iops * (runtime + RAMP_S) / 1e6  # millions of requests
    if not done:
        return res
    store = spent[1] / done if len(spent) > 1 else 0.0
    return dataclasses.replace(res, server_cpu_us=spent[0] / done, store_cpu_us=store)


def netswap_cmd(port: int, extra: list[str], netswap: str = "") -> list[str]:
    netswap = netswap or str(Path(sys.executable).parent / "netswap")
    return [netswap, "serve", "--listen", f"127.0.0.1:{port}", "--size", SIZE, "--no-mlock",
            *extra]  # fmt: skip


def peer_cmd(port: int) -> list[str]:
    return ["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", str(port), "memory",
            SIZE]  # fmt: skip


def floor_cmd(port: int, *keys: str) -> list[str]:
    """The floor plugin (keys: model=..., handoff=...), with this venv's uvloop on its path."""
    plugin = str(Path(__file__).with_name("floor_plugin.py"))
    site = sysconfig.get_paths()["purelib"]
    return ["env", f"PYTHONPATH={site}", "nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1",
            "-p", str(port), "python", plugin, *keys]  # fmt: skip


@contextmanager
def dashboard_poller(http: int) -> Iterator[None]:
    """What an open dashboard does: GET /api/stats every second (plus /metrics)."""
    stop = threading.Event()

    def poll() -> None:
        wait_for_port(http)
        while not stop.wait(1.0):
            for path in ("/api/stats", "/metrics"):
                with urllib.request.urlopen(f"http://127.0.0.1:{http}{path}", timeout=5) as r:
                    r.read()

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=float, default=4)
    parser.add_argument("--netswap-arg", action="append", default=[])
    parser.add_argument(
        "--dashboard",
        action="store_true",
        help="add netswap+dash: the same export with --http, polled each second",
    )
    args = parser.parse_args()
    results: dict[str, dict[str, list[Result]]] = {
        "netswap": {},
        "nbdkit-memory": {},
        "py-floor": {},
    }
    p1, p2, p3 = free_port(), free_port(), free_port()
    with ExitStack() as stack:
        ours = stack.enter_context(server(netswap_cmd(p1, args.netswap_arg), p1))
        peer = stack.enter_context(server(peer_cmd(p2), p2))
        floor = stack.enter_context(server(floor_cmd(p3), p3))
        uris = {"netswap": ours, "nbdkit-memory": peer, "py-floor": floor}
        if args.dashboard:
            p4, http = free_port(), free_port()
            cmd = netswap_cmd(p4, [*args.netswap_arg, "--http", f"127.0.0.1:{http}"])
            uris["netswap+dash"] = stack.enter_context(server(cmd, p4))
            results["netswap+dash"] = {}
            stack.enter_context(dashboard_poller(http))
        for uri in uris.values():
            prefill(uri, SIZE)
        for _ in range(args.rounds):
            for work in WORKLOADS:
                for name, uri in uris.items():
                    res = fio(uri, work, SIZE, args.runtime)
                    results[name].setdefault(work.name, []).append(res)
    report(results, args.rounds)


def report(results: dict[str, dict[str, list[Result]]], rounds: int) -> None:
    print(f"fio ioengine=nbd, {SIZE} prefilled exports, medians of {rounds} alternating rounds")
    head = f"{'workload':<20}{'server':<15}{'IOPS':>10}{'p50 us':>9}{'p99 us':>9}"
    print(head + f"{'IOPS x':>9}{'p50 x':>8}")
    for work in WORKLOADS:
        med = {}
        for name in results:
            runs = results[name][work.name]
            med[name] = (
                statistics.median(r.iops for r in runs),
                statistics.median(r.p50_us for r in runs),
                statistics.median(r.p99_us for r in runs),
            )
        peer = med["nbdkit-memory"]
        for name, (iops, p50, p99) in med.items():
            ratio = (
                f"{iops / peer[0]:>9.2f}{p50 / peer[1]:>8.2f}" if name != "nbdkit-memory" else ""
            )
            print(f"{work.name:<20}{name:<15}{iops:>10,.0f}{p50:>9.1f}{p99:>9.1f}{ratio}")
    print("ratios are against nbdkit-memory (IOPS: higher is better; p50: lower is better);")
    print("py-floor is a Python plugin doing one memoryview copy per request: the glue's cost")


if __name__ == "__main__":
    main()
