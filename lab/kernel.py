"""The kernel-only lab: a stock Linux kernel swaps through netswap inside QEMU.

This host's kernel has no nbd driver, so the real path -- nbd-client, mkswap,
swapon, the kernel swapping -- is proven in a guest: Debian's own kernel under
TCG with a busybox initramfs (deploy/lab/vm/), reaching netswap on the host's
127.0.0.1 as 10.0.2.2 through QEMU's user-mode network. The guest runs the very
commands `netswap attach --print-plan` prints (packed as /plan.sh into a small
second initramfs archive), then a strict verifier writes a seeded pattern over
several times its RAM and reads it all back. The serial log is kept; a run that
overstays its deadline gets the guest's blocked tasks dumped (sysrq-w through
the QEMU monitor) into that log before QEMU is stopped.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from netswap.client.nbd.attach import MIN_FREE_KBYTES_FLOOR, plan

from .cluster import cluster
from .cpio import newc_archive
from .ports import ExitedEarly, free_port, wait_port
from .qemu import CACHE, LabError, build_guest, run_guest


@dataclass
class Outcome:
    verdict: str = "FAIL"
    reason: str = ""
    stages: dict[str, float] = field(default_factory=dict)
    pages: int = 0
    verified: int = 0
    write_s: float = 0.0
    verify_s: float = 0.0
    pswpin: int = 0
    pswpout: int = 0
    elapsed_s: float = 0.0


def run_lab(args: argparse.Namespace) -> Outcome:
    size = args.size or 4 * args.ram
    build_guest()
    with ExitStack() as stack:
        port = free_port()
        export_mib = size + 256
        serve = ["serve", "--listen", f"127.0.0.1:{port}", "--size", f"{export_mib}M"]
        if args.backend == "remote":
            for _ in range(args.stores):
                store_port = free_port()
                store = ["store", "--listen", f"127.0.0.1:{store_port}", "--capacity",
                         f"{export_mib}M"]  # fmt: skip
                stack.enter_context(child(store, store_port))
                serve += ["--store", f"127.0.0.1:{store_port}"]
            serve += ["--backend", "remote", "--area", "labguest"]
            if args.replicas:
                serve += ["--replicas", str(args.replicas)]
            if args.cache:
                serve += ["--cache", args.cache]
        elif args.backend == "cluster":  # 3 masters, 3 replicas of redis-server (#25)
            made = stack.enter_context(cluster(3, 1, maxmemory=f"{export_mib}mb"))
            serve += ["--backend", "remote", "--cluster", made.url, "--area", "labguest"]
        stack.enter_context(child(serve, port))
        initrd = CACHE / f"initrd-{port}.img"
        stack.callback(initrd.unlink, missing_ok=True)
        base = (CACHE / "initrd.img").read_bytes()
        # The kernel looks for a following archive only at 4-byte offsets (and skips
        # zero padding), so pad the compressed image before appending ours.
        initrd.write_bytes(base + b"\0" * (-len(base) % 4) + plan_archive(port))
        log = args.log or CACHE / f"serial-{args.backend}.log"
        return boot(args, initrd, log, size)


def plan_archive(port: int) -> bytes:
    ns = argparse.Namespace(
        device="/dev/nbd0", export="swap", priority=None, discard=False,
        min_free_kbytes=MIN_FREE_KBYTES_FLOOR,
    )  # fmt: skip
    lines = ["#!/bin/sh", "set -e"]
    lines += [" ".join(cmd) for cmd in plan(ns, f"10.0.2.2:{port}")]
    return newc_archive({"plan.sh": ("\n".join(lines) + "\n").encode()}, mode=0o100755)


def boot(args: argparse.Namespace, initrd: Path, log: Path, size: int) -> Outcome:
    cmdline = f"netswap.mib={size} netswap.seed={args.seed} netswap.passes={args.passes}"
    outcome = Outcome()
    start = time.monotonic()
    # The host-in-guest campaign's baseline runs on the same machine as its guests.
    same = getattr(args, "same_machine", False)
    machine = ["-smp", str(args.cpus), "-accel", "tcg,thread=multi"] if same else None
    cpu = args.cpu_model if same else "max"
    run = run_guest(args.ram, initrd, cmdline, log, args.timeout,
                    lambda line: parse_line(line, outcome, start), machine, cpu=cpu)  # fmt: skip
    outcome.elapsed_s = run.elapsed_s
    if run.timed_out:
        outcome.verdict = "HANG"
        outcome.reason = f"timeout after {args.timeout:.0f}s (blocked tasks dumped to {log})"
    elif outcome.verdict == "PASS":
        floor = size * 256 - args.ram * 256
        if outcome.pswpout < floor:
            outcome.verdict = "FAIL"
            outcome.reason = f"pswpout {outcome.pswpout} < {floor}: the kernel did not swap enough"
    elif not outcome.reason:
        outcome.reason = run.qemu_error or "guest stopped without a result"
    return outcome


_KV = re.compile(r"(\w+)=(\S+)")


def parse_line(line: str, outcome: Outcome, start: float) -> None:
    if line.startswith("NETSWAP-STAGE "):
        _, stage, uptime = line.split()[:3]
        outcome.stages[stage] = float(uptime)
        print(f"  [{time.monotonic() - start:6.1f}s] guest: {stage} (guest uptime {uptime}s)",
              flush=True)  # fmt: skip
    elif line.startswith("SWAPTEST progress"):
        print(f"  [{time.monotonic() - start:6.1f}s] {line[9:]}", flush=True)
    elif line.startswith("SWAPTEST PASS") or line.startswith("SWAPTEST FAIL"):
        kv = dict(_KV.findall(line))
        outcome.pages += int(kv.get("pages", 0))
        outcome.verified += int(kv.get("verified", 0))
        outcome.write_s += float(kv.get("write_s", 0))
        outcome.verify_s += float(kv.get("verify_s", 0))
        if "FAIL" in line:
            outcome.reason = line[9:]
    elif line.startswith("NETSWAP-RESULT "):
        kv = dict(_KV.findall(line))
        outcome.verdict = line.split()[1]
        outcome.pswpin = int(kv.get("pswpin", 0))
        outcome.pswpout = int(kv.get("pswpout", 0))
        if outcome.verdict != "PASS" and not outcome.reason:
            outcome.reason = kv.get("reason", line)


def print_summary(args: argparse.Namespace, o: Outcome) -> None:
    size = args.size or 4 * args.ram
    moved = 2 * size * args.passes
    seconds = o.write_s + o.verify_s
    print(f"netswap lab vm ({args.backend}): {o.verdict}" + (f" -- {o.reason}" if o.reason else ""))
    print(f"  guest RAM {args.ram} MiB, pattern {size} MiB x {args.passes} pass(es)")
    if "boot" in o.stages:
        print(
            f"  boot to init {o.stages['boot']:.1f}s, "
            f"attached at {o.stages.get('attached', 0):.1f}s"
        )
    print(f"  pages written {o.pages}, verified {o.verified}")
    print(f"  pswpout {o.pswpout} pages ({o.pswpout // 256} MiB), pswpin {o.pswpin} pages")
    if seconds:
        print(f"  {moved / seconds:.1f} MiB/s through swap (write+verify), run {o.elapsed_s:.0f}s")


class child:
    """A `netswap` subcommand as a child process, up once its port answers."""

    def __init__(self, argv: list[str], port: int) -> None:
        self.argv, self.port = argv, port
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "netswap.client.cli", *self.argv]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        proc = self.proc
        try:
            wait_port(self.port, lambda: proc.poll() is None)
        except (ExitedEarly, TimeoutError):
            self.__exit__()
            raise LabError(f"`netswap {' '.join(self.argv[:1])}` did not come up") from None
        return proc

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
