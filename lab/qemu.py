"""Booting a lab guest under QEMU TCG and following its serial log.

Both labs use it: the kernel-only one (`vm.py`: the guest runs nbd-client and
the verifier, netswap stays on the host) and the host-in-guest one
(`hostguest.py`: the guest runs attach, nbdkit and the agent too). The guest
writes lines to its serial console; `run_guest` hands each complete line to
the caller as it appears, and when the deadline passes it first asks the guest
kernel for its blocked tasks (sysrq-w through the QEMU monitor) so the kept
log shows where it hung, then stops QEMU. A stall deadline does the same when
no progress line has appeared for that long: on a loaded machine a slow run is
not a hang, and a run that stopped moving is one well before the hard deadline.
"""

from __future__ import annotations

import fcntl
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .ports import free_port

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "deploy" / "lab" / "vm"
CACHE = REPO / ".cache" / "lab"
# Seconds the guest gets to print the blocked tasks after sysrq-w, before it is killed.
SYSRQ_GRACE_S = 5


class LabError(Exception):
    """The lab could not run (missing tools, build failure)."""


@dataclass
class Boot:
    timed_out: bool
    elapsed_s: float
    qemu_error: str
    stalled_s: float = 0.0  # >0: stopped for want of progress, after this many seconds

    def hang_reason(self, timeout: float, log: Path) -> str:
        if self.stalled_s:
            return f"no progress for {self.stalled_s:.0f}s; blocked tasks in {log}"
        return f"deadline {timeout:.0f}s passed; blocked tasks in {log}"


def build_guest() -> None:
    """Build or reuse the kernel and both initramfs images in .cache/lab (one builder
    at a time: labs may start together, as make test's parallel workers do)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = subprocess.run([str(LAB / "build-guest.sh"), str(CACHE)], capture_output=True,
                                text=True)  # fmt: skip
    if result.returncode != 0:
        raise LabError(f"building the guest failed: {result.stderr.strip()[-400:]}")


def run_guest(
    ram_mib: int,
    initrd: Path,
    cmdline: str,
    log: Path,
    timeout: float,
    on_line: Callable[[str], None],
    extra: list[str] | None = None,
    nic: str = "user,model=e1000",
    sysrq: str = "w",
    cpu: str = "max",
    stall_s: float = 0.0,
    progress: tuple[str, ...] = (),
    sysrq_now: Callable[[], str] | None = None,
) -> Boot:
    """Boot, follow the serial log, stop at the deadline (or after `stall_s` without a
    line starting with one of `progress`; 0: no stall deadline). `sysrq_now`, asked
    as the log is followed, may name sysrq keys to send at once (e.g. "w" when the
    caller sees the guest stuck: its own userspace may be too starved to ask)."""
    monitor = free_port()
    cmd = [
        "qemu-system-x86_64", "-machine", "q35", "-cpu", cpu,
        "-m", f"{ram_mib}M", "-kernel", str(CACHE / "vmlinuz"), "-initrd", str(initrd),
        "-append", f"console=ttyS0 panic=-1 quiet sysrq_always_enabled {cmdline}",
        "-nic", nic, "-display", "none", "-no-reboot",
        "-serial", f"file:{log}", "-monitor", f"tcp:127.0.0.1:{monitor},server,nowait",
        *(extra or ["-smp", "1", "-accel", "tcg"]),
    ]  # fmt: skip
    log.unlink(missing_ok=True)
    start = time.monotonic()
    try:
        qemu = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise LabError("qemu-system-x86_64 is missing (apt-get install qemu-system-x86)") from None
    seen = 0
    timed_out = False
    moved = start
    stalled = 0.0
    while True:
        # Asked before the read: the last read follows QEMU's exit, so the guest's last
        # lines (its verdict, printed just before it powers off) are never left unread.
        exited = qemu.poll() is not None
        text = log.read_text(errors="replace") if log.exists() else ""
        for line in text[seen:].splitlines(keepends=True):
            if not line.endswith("\n"):
                break
            seen += len(line)
            on_line(line.strip())
            if line.startswith(progress):
                moved = time.monotonic()
        if exited:
            break
        keys = sysrq_now() if sysrq_now is not None else ""
        if keys:
            dump_blocked_tasks(monitor, keys)
        idle = time.monotonic() - moved
        if time.monotonic() - start > timeout or (stall_s and idle > stall_s):
            stalled = idle if stall_s and idle > stall_s else 0.0
            dump_blocked_tasks(monitor, sysrq)
            qemu.kill()
            timed_out = True
            break
        time.sleep(0.2)
    qemu.wait()
    err = qemu.stderr.read().decode(errors="replace").strip() if qemu.stderr else ""
    if qemu.stderr:
        qemu.stderr.close()
    return Boot(timed_out, time.monotonic() - start, err[-300:], stalled)


def dump_blocked_tasks(port: int, keys: str = "w") -> None:
    """sysrq-w: blocked tasks; sysrq-t: every task (userspace servers sleep in S)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as mon:
            for key in keys:
                mon.sendall(f"sendkey alt-sysrq-{key}\n".encode())
                time.sleep(SYSRQ_GRACE_S)
    except OSError:
        pass
