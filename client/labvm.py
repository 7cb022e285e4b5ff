"""`netswap lab vm`: a stock Linux kernel swaps through netswap inside QEMU.

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
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from netswap.server.plugin_config import CACHE_MODES

from .attach import MIN_FREE_KBYTES_FLOOR, plan
from .cpio import newc_archive

REPO = Path(__file__).resolve().parent.parent
LAB = REPO / "deploy" / "lab" / "vm"
CACHE = REPO / ".cache" / "lab"


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ram", type=int, default=128, help="guest RAM in MiB (default 128)")
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
    outcome = run_lab(args)
    print_summary(args, outcome)
    return 0 if outcome.verdict == "PASS" else 1


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
        stack.enter_context(child(serve, port))
        initrd = CACHE / f"initrd-{port}.img"
        stack.callback(initrd.unlink, missing_ok=True)
        base = (CACHE / "initrd.img").read_bytes()
        # The kernel looks for a following archive only at 4-byte offsets (and skips
        # zero padding), so pad the compressed image before appending ours.
        initrd.write_bytes(base + b"\0" * (-len(base) % 4) + plan_archive(port))
        log = args.log or CACHE / f"serial-{args.backend}.log"
        return boot(args, initrd, log, size)


def build_guest() -> None:
    result = subprocess.run([str(LAB / "build-guest.sh"), str(CACHE)], capture_output=True,
                            text=True)  # fmt: skip
    if result.returncode != 0:
        raise LabError(f"building the guest failed: {result.stderr.strip()[-400:]}")


class LabError(Exception):
    """The lab could not run (missing tools, build failure)."""


def plan_archive(port: int) -> bytes:
    ns = argparse.Namespace(
        device="/dev/nbd0", export="swap", priority=None, discard=False,
        min_free_kbytes=MIN_FREE_KBYTES_FLOOR,
    )  # fmt: skip
    lines = ["#!/bin/sh", "set -e"]
    lines += [" ".join(cmd) for cmd in plan(ns, "10.0.2.2", port)]
    return newc_archive({"plan.sh": ("\n".join(lines) + "\n").encode()}, mode=0o100755)


def boot(args: argparse.Namespace, initrd: Path, log: Path, size: int) -> Outcome:
    monitor = free_port()
    cmdline = (f"console=ttyS0 panic=-1 quiet sysrq_always_enabled netswap.mib={size} "
               f"netswap.seed={args.seed} netswap.passes={args.passes}")  # fmt: skip
    cmd = [
        "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-smp", "1",
        "-m", f"{args.ram}M", "-kernel", str(CACHE / "vmlinuz"), "-initrd", str(initrd),
        "-append", cmdline, "-nic", "user,model=e1000", "-display", "none", "-no-reboot",
        "-serial", f"file:{log}", "-monitor", f"tcp:127.0.0.1:{monitor},server,nowait",
    ]  # fmt: skip
    log.unlink(missing_ok=True)
    start = time.monotonic()
    try:
        qemu = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise LabError("qemu-system-x86_64 is missing (apt-get install qemu-system-x86)") from None
    outcome = Outcome()
    seen = 0
    while True:
        text = log.read_text(errors="replace") if log.exists() else ""
        for line in text[seen:].splitlines(keepends=True):
            if not line.endswith("\n"):
                break
            seen += len(line)
            parse_line(line.strip(), outcome, start)
        if qemu.poll() is not None:
            break
        if time.monotonic() - start > args.timeout:
            dump_blocked_tasks(monitor)
            qemu.kill()
            outcome.reason = f"timeout after {args.timeout:.0f}s (blocked tasks dumped to {log})"
            break
        time.sleep(0.2)
    qemu.wait()
    outcome.elapsed_s = time.monotonic() - start
    if outcome.verdict == "PASS":
        floor = size * 256 - args.ram * 256
        if outcome.pswpout < floor:
            outcome.verdict = "FAIL"
            outcome.reason = f"pswpout {outcome.pswpout} < {floor}: the kernel did not swap enough"
    elif not outcome.reason:
        err = qemu.stderr.read().decode(errors="replace").strip() if qemu.stderr else ""
        outcome.reason = err[-300:] or "guest stopped without a result"
    if qemu.stderr:
        qemu.stderr.close()
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


def dump_blocked_tasks(port: int) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as mon:
            mon.sendall(b"sendkey alt-sysrq-w\n")
            time.sleep(3)
    except OSError:
        pass


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class child:
    """A `netswap` subcommand as a child process, up once its port answers."""

    def __init__(self, argv: list[str], port: int) -> None:
        self.argv, self.port = argv, port
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "netswap.client.cli", *self.argv]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self.proc
            except OSError:
                time.sleep(0.1)
        self.__exit__()
        raise LabError(f"`netswap {' '.join(self.argv[:1])}` did not come up")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
