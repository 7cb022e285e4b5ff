"""`netswap lab vm`: a stock Linux kernel in QEMU swaps through netswap.

Two labs behind one command: the kernel-only one (`kernel.py`: the guest runs
nbd-client and the verifier, netswap runs here) and, with --host-in-guest,
the whole swapping host in the guest (`hostguest.py`: attach, nbdkit and the
agent too, and the hang campaign).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from netswap.client.nbd.config import CACHE_MODES

from .hostguest import CONFIGS, run_campaign
from .kernel import print_summary, run_lab
from .qemu import build_guest

# Guest RAM by default: the kernel-only guest needs little; the host-in-guest one
# also pays for python, nbdkit and the agent.
KERNEL_ONLY_RAM = 128
HOST_IN_GUEST_RAM = 384


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ram", type=int, help=f"guest RAM in MiB (default {KERNEL_ONLY_RAM}; "
                        f"{HOST_IN_GUEST_RAM} with --host-in-guest)")  # fmt: skip
    parser.add_argument("--size", type=int, help="MiB the verifier pushes (default 4x RAM)")
    parser.add_argument("--backend", choices=("memory", "remote", "cluster"), default="memory",
                        help="the agent's store tier: the embedded memory store, netswap "
                        "stores, or a Redis cluster (redis-server on this host)")  # fmt: skip
    parser.add_argument("--stores", type=int, default=2, help="store processes (remote)")
    parser.add_argument("--replicas", type=int, help="copies per page (remote)")
    parser.add_argument("--cache", choices=CACHE_MODES, help="the agent's write mode (remote)")
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900, help="hard deadline in seconds")
    parser.add_argument("--log", type=Path, help="serial log (default .cache/lab/serial-*.log)")
    host = parser.add_argument_group("host in guest: attach, nbdkit and the agent in the guest")
    host.add_argument("--host-in-guest", action="store_true",
                      help="the whole swapping host in the guest; stores stay here")  # fmt: skip
    host.add_argument("--runs", type=int, default=1, help="runs per configuration")
    # 10 % of a 768 MiB pattern at the slowest storm seen (1.5 MiB/s, a loaded machine)
    # is 51 s; attach's longest stage (python's imports over 9p) about 90 s.
    host.add_argument("--stall", type=float, default=240,
                      help="HANG when the guest shows no progress for this many seconds "
                      "(default 240; 0: only the hard deadline)")  # fmt: skip
    host.add_argument("--cpus", type=int, default=2, help="guest vCPUs (MTTCG; default 2)")
    # qemu64, not max: TCG emulates max's PCLMUL/AVX (zlib's CRC32 path) by helper
    # calls; measured 1.56x faster end to end (173 s vs 270 s for the same run).
    host.add_argument("--cpu-model", default="qemu64", help="QEMU -cpu (default qemu64)")
    host.add_argument("--configs", help=f"comma-separated, from {','.join(CONFIGS)} "
                      "(default: defaults)")  # fmt: skip
    host.add_argument("--baseline", action="store_true",
                      help="also run the kernel-only path, for the MiB/s ratio")  # fmt: skip
    host.add_argument("--screenshot", type=Path, help="dashboard PNG taken mid-storm")
    host.add_argument("--http-port", type=int, default=0,
                      help="forward the guest's ops endpoint here (default: free)")  # fmt: skip
    host.add_argument("--kills", type=int, default=0,
                      help="kill -9 nbdkit mid-storm: once while swap-out dominates, once "
                      "while swap-in does, that time after the supervisor itself was killed "
                      "-9 and `netswap adopt` replaced it (0-2); the supervisor must bring "
                      "nbdkit back")  # fmt: skip
    host.add_argument("--restarts", type=int, default=0,
                      help="`netswap restart` mid-storm, an upgrade (0-1)")  # fmt: skip
    host.add_argument("--stall-stores", type=float, default=0, metavar="SECONDS",
                      help="stop the stores (SIGSTOP) for this long mid-storm, then let them "
                      "go on; every page must still verify (0: no stall)")  # fmt: skip
    host.add_argument("--content", choices=("random", "mixed"), default="random",
                      help="what the storm writes: random pages, or pages like real memory's "
                      "(zero, same-filled, random, text-like: netswap compresses them); the "
                      "stores' bytes are reported against the pages swapped")  # fmt: skip
    host.add_argument("--attach-arg", action="append", default=[],
                      help="extra attach option in the guest: --attach-arg=--discard")  # fmt: skip
    host.add_argument("--serve-arg", action="append", default=[],
                      help="extra serve option in the guest: --serve-arg=--no-mlock")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.host_in_guest:
        args.ram = args.ram or HOST_IN_GUEST_RAM
        build_guest()
        return run_campaign(args)
    args.ram = args.ram or KERNEL_ONLY_RAM
    outcome = run_lab(args)
    print_summary(args, outcome)
    return 0 if outcome.verdict == "PASS" else 1
