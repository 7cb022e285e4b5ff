"""make bench-agent: fio through plugin -> agent -> page store(s) on loopback.

Same run, same client (fio ioengine=nbd), alternating between:
  agent-batched    netswap serve --backend remote, default batching (64 pages)
  agent-unbatched  the same with --batch-pages 1: one page per RPC
  agent-2x         two stores, --replicas 2, default batching
  nbdkit-memory    the peer
Prints IOPS, p50/p99, and the ratios batched/unbatched and batched/nbdkit-memory.
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import ExitStack

from ..conftest import free_port
from ..procs import StoreProc
from .bench_nbd import netswap_cmd, peer_cmd, server
from .fio import Result, Workload, fio, prefill

SIZE = "256M"
WORKLOADS = (
    Workload("4K randwrite QD1", "randwrite", "4k", 1),
    Workload("4K randwrite QD32", "randwrite", "4k", 32),
    Workload("4K randread QD32", "randread", "4k", 32),
    Workload("128K randwrite QD8", "randwrite", "128k", 8),
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runtime", type=float, default=4)
    args = parser.parse_args()
    with ExitStack() as stack:
        s1, s2, s3 = (StoreProc("1G").start() for _ in range(3))
        for s in (s1, s2, s3):
            stack.callback(s.kill)
        one = ["--backend", "remote", "--store", s1.address, "--area", "bench1"]
        two = ["--backend", "remote", "--store", s2.address, "--store", s3.address,
               "--replicas", "2", "--area", "bench2"]  # fmt: skip
        configs = {
            "agent-batched": one,
            "agent-unbatched": [*one, "--batch-pages", "1", "--area", "bench1u"],
            "agent-2x": two,
        }
        uris = {}
        for name, extra in configs.items():
            port = free_port()
            uris[name] = stack.enter_context(server(netswap_cmd(port, extra), port))
        port = free_port()
        uris["nbdkit-memory"] = stack.enter_context(server(peer_cmd(port), port))
        for uri in uris.values():
            prefill(uri, SIZE)
        results: dict[str, dict[str, list[Result]]] = {name: {} for name in uris}
        for _ in range(args.rounds):
            for work in WORKLOADS:
                for name, uri in uris.items():
                    results[name].setdefault(work.name, []).append(
                        fio(uri, work, SIZE, args.runtime)
                    )
    report(results, args.rounds)


def report(results: dict[str, dict[str, list[Result]]], rounds: int) -> None:
    print(f"fio ioengine=nbd, {SIZE} prefilled, medians of {rounds} alternating rounds")
    print(f"{'workload':<20}{'server':<17}{'IOPS':>10}{'p50 us':>9}{'p99 us':>9}")
    for work in WORKLOADS:
        med = {
            name: tuple(
                statistics.median(getattr(r, f) for r in runs[work.name])
                for f in ("iops", "p50_us", "p99_us")
            )
            for name, runs in results.items()
        }
        for name, (iops, p50, p99) in med.items():
            print(f"{work.name:<20}{name:<17}{iops:>10,.0f}{p50:>9.1f}{p99:>9.1f}")
        batched, unbatched = med["agent-batched"][0], med["agent-unbatched"][0]
        peer = med["nbdkit-memory"][0]
        print(
            f"{'':<20}batched/unbatched {batched / unbatched:.2f}x, "
            f"batched/nbdkit-memory {batched / peer:.2f}x, "
            f"2 replicas/nbdkit-memory {med['agent-2x'][0] / peer:.2f}x"
        )


if __name__ == "__main__":
    main()
