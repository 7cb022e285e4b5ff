"""make bench-agent: fio through plugin -> agent -> page store(s) on loopback.

Same run, same client (fio ioengine=nbd), alternating between:
  agent-batched    netswap serve --backend remote, default batching (64 pages)
  agent-loop       the same with --reads loop --writes loop: every swap-in and
                   lone swap-out through the agent's loop thread instead of
                   straight from nbdkit's thread
  agent-unbatched  the same with --batch-pages 1: one page per RPC
  agent-2x         two stores, --replicas 2, default batching
  agent-writeback  agent-batched with --cache writeback (acknowledged from the reserve)
  agent-tls        agent-batched against a TLS store (--store-tls-ca)
  nbdkit-memory    the peer
  py-parallel      floor: a PARALLEL Python plugin doing one copy per request
  py-handoff       floor: the same plus the agent's hand-off to an event-loop
                   thread that completes each request at once (no agent work,
                   no network) -- the ceiling of this architecture
  py-combine       floor: no loop thread; requests combine into batches, the
                   first thread in making one raw 4 KiB round trip to an echo
                   process per batch (#12's combining design, no agent work)
  py-rpc           floor: one raw round trip per request on its thread's own
                   connection (the direct path's shape, no agent work)
Prints IOPS, pages/s, p50/p99, and the ratios batched/unbatched,
batched/nbdkit-memory, batched/py-handoff and each floor's ceiling against
py-parallel. With --cpus LIST every Python
server (the agents and the floors) runs pinned there (serve --cpus, taskset
for the floors); nbdkit-memory, a C server without a GIL, runs as it likes.
--sched batch applies to the agents only: the floors measured faster without it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from contextlib import ExitStack
from pathlib import Path

from ..conftest import free_port
from ..pki import make_pki
from ..procs import StoreProc
from .bench_nbd import floor_cmd, netswap_cmd, peer_cmd, server
from .fio import Result, Workload, fio, prefill

SIZE = "256M"
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runtime", type=float, default=4)
    parser.add_argument("--cpus", help="pin the Python servers to these CPUs")
    parser.add_argument("--sched", default="normal", help="the agents' scheduling policy")
    parser.add_argument("--only", default="", help="workloads whose name contains this")
    args = parser.parse_args()
    workloads = [w for w in WORKLOADS if args.only in w.name]
    pin = [*(["--cpus", args.cpus] if args.cpus else []), "--sched", args.sched]
    taskset = ["taskset", "-c", args.cpus] if args.cpus else []
    with ExitStack() as stack:
        pki = make_pki(Path(stack.enter_context(tempfile.TemporaryDirectory())))
        tls = ("--tls-cert", str(pki.store_cert), "--tls-key", str(pki.store_key))
        s1, s2, s3 = (StoreProc("1G").start() for _ in range(3))
        s4 = StoreProc("1G", tls).start()
        for s in (s1, s2, s3, s4):
            stack.callback(s.kill)
        one = ["--backend", "remote", "--store", s1.address, "--area", "bench1", *pin]
        tls_one = ["--backend", "remote", "--store", s4.address, "--store-tls-ca", str(pki.ca),
                   "--area", "bench1t", *pin]  # fmt: skip
        two = ["--backend", "remote", "--store", s2.address, "--store", s3.address,
               "--replicas", "2", "--area", "bench2", *pin]  # fmt: skip
        commands = {
            "agent-batched": lambda port: netswap_cmd(port, one),
            "agent-loop": lambda port: netswap_cmd(
                port, [*one, "--reads", "loop", "--writes", "loop", "--area", "bench1l"]
            ),
            "agent-unbatched": lambda port: netswap_cmd(
                port, [*one, "--batch-pages", "1", "--area", "bench1u"]
            ),
            "agent-2x": lambda port: netswap_cmd(port, two),
            "agent-writeback": lambda port: netswap_cmd(
                port, [*one, "--cache", "writeback", "--area", "bench1w"]
            ),
            "agent-tls": lambda port: netswap_cmd(port, tls_one),
            "nbdkit-memory": peer_cmd,
            "py-parallel": lambda port: [*taskset, *floor_cmd(port, "model=parallel")],
            "py-handoff": lambda port: [
                *taskset,
                *floor_cmd(port, "model=parallel", "handoff=1"),
            ],
            "py-combine": lambda port: [
                *taskset,
                *floor_cmd(port, "model=parallel", "handoff=combine"),
            ],
            "py-rpc": lambda port: [*taskset, *floor_cmd(port, "model=parallel", "handoff=rpc")],
        }
        uris = {}
        for name, command in commands.items():
            port = free_port()
            uris[name] = stack.enter_context(server(command(port), port))
        for uri in uris.values():
            prefill(uri, SIZE)
        results: dict[str, dict[str, list[Result]]] = {name: {} for name in uris}
        for _ in range(args.rounds):
            for work in workloads:
                for name, uri in uris.items():
                    results[name].setdefault(work.name, []).append(
                        fio(uri, work, SIZE, args.runtime)
                    )
    placement = f"Python servers on CPU {args.cpus}" if args.cpus else "no CPU pinning"
    report(results, workloads, args.rounds, f"{placement}, agents --sched {args.sched}")


def report(
    results: dict[str, dict[str, list[Result]]],
    workloads: list[Workload],
    rounds: int,
    placement: str,
) -> None:
    print(
        f"fio ioengine=nbd, {SIZE} prefilled, medians of {rounds} alternating rounds, {placement}"
    )
    print(f"{'workload':<20}{'server':<17}{'IOPS':>10}{'pages/s':>10}{'p50 us':>9}{'p99 us':>9}")
    for work in workloads:
        pages = int(work.bs.rstrip("k")) // 4
        med = {
            name: tuple(
                statistics.median(getattr(r, f) for r in runs[work.name])
                for f in ("iops", "p50_us", "p99_us")
            )
            for name, runs in results.items()
        }
        for name, (iops, p50, p99) in med.items():
            print(
                f"{work.name:<20}{name:<17}{iops:>10,.0f}{iops * pages:>10,.0f}"
                f"{p50:>9.1f}{p99:>9.1f}"
            )
        batched = med["agent-batched"][0]
        ratios = {
            "p50 batched/nbdkit-memory": med["agent-batched"][1] / med["nbdkit-memory"][1],
            "batched/py-parallel": batched / med["py-parallel"][0],
            "direct/loop": batched / med["agent-loop"][0],
            "batched/unbatched": batched / med["agent-unbatched"][0],
            "batched/nbdkit-memory": batched / med["nbdkit-memory"][0],
            "batched/py-handoff": batched / med["py-handoff"][0],
            "py-handoff/nbdkit-memory": med["py-handoff"][0] / med["nbdkit-memory"][0],
            "2 replicas/batched": med["agent-2x"][0] / batched,
            "writeback/nbdkit-memory": med["agent-writeback"][0] / med["nbdkit-memory"][0],
            "tls/batched": med["agent-tls"][0] / batched,
        }
        parallel = med["py-parallel"][0]
        # The ceilings of the three shapes a networked plugin can take, no agent work.
        ratios.update({f"{f}/py-parallel": med[f][0] / parallel
                       for f in ("py-handoff", "py-combine", "py-rpc")})  # fmt: skip
        print(f"{'':<20}" + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
