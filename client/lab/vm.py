"""`netswap lab vm`: a stock Linux kernel in QEMU swaps through netswap.

The guest runs nbd-client and the verifier; netswap runs here (`kernel.py`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..nbd.config import CACHE_MODES
from .kernel import print_summary, run_lab

KERNEL_ONLY_RAM = 128


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ram", type=int, help=f"guest RAM in MiB (default {KERNEL_ONLY_RAM})")
    parser.add_argument("--size", type=int, help="MiB the verifier pushes (default 4x RAM)")
    parser.add_argument("--backend", choices=("memory", "remote"), default="memory")
    parser.add_argument("--stores", type=int, default=2, help="store processes (remote)")
    parser.add_argument("--replicas", type=int, help="copies per page (remote)")
    parser.add_argument("--cache", choices=CACHE_MODES, help="the agent's write mode (remote)")
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900, help="hard deadline in seconds")
    parser.add_argument("--log", type=Path, help="serial log (default .cache/lab/serial-*.log)")


def run(args: argparse.Namespace) -> int:
    args.ram = args.ram or KERNEL_ONLY_RAM
    outcome = run_lab(args)
    print_summary(args, outcome)
    return 0 if outcome.verdict == "PASS" else 1
