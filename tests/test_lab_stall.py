"""The lab's stall deadline, against a stand-in for qemu (fast; the real guests are in
test_lab_vm.py): a guest that stops printing progress is a HANG long before the hard
deadline, and one that keeps printing is not stopped by it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from netswap.lab.qemu import run_guest

# A qemu that writes its serial log as a guest would: `lines` progress lines, one per
# 0.2 s, then only non-progress chatter (the vitals loop) until killed or done.
FAKE_QEMU = """#!/bin/sh
for a in "$@"; do case "$a" in file:*) log="${a#file:}";; esac; done
i=0
while [ $i -lt {lines} ]; do
  echo "SWAPTEST progress write $i%" >> "$log"; i=$((i+1)); sleep 0.2
done
j=0
while [ $j -lt {chatter} ]; do
  echo "NETSWAP-VITALS up=$j" >> "$log"; j=$((j+1)); sleep 0.2
done
"""


def fake_guest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lines: int, chatter: int,
               stall_s: float, timeout: float = 60) -> tuple[bool, float, float]:  # fmt: skip
    qemu = tmp_path / "qemu-system-x86_64"
    qemu.write_text(FAKE_QEMU.replace("{lines}", str(lines)).replace("{chatter}", str(chatter)))
    qemu.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    seen: list[str] = []
    boot = run_guest(128, tmp_path / "initrd", "", tmp_path / "serial.log", timeout,
                     seen.append, stall_s=stall_s, progress=("SWAPTEST ",))  # fmt: skip
    assert seen[:1] == ["SWAPTEST progress write 0%"]
    return boot.timed_out, boot.stalled_s, boot.elapsed_s


def test_a_guest_that_stops_moving_is_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    timed_out, stalled, elapsed = fake_guest(tmp_path, monkeypatch, lines=3, chatter=1000,
                                             stall_s=2)  # fmt: skip
    assert timed_out and stalled > 2
    assert elapsed < 30  # well before the 60 s hard deadline (sysrq grace included)


def test_a_guest_that_keeps_moving_is_not(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 25 progress lines over ~5 s, each gap far below the 2 s stall deadline.
    timed_out, stalled, _ = fake_guest(tmp_path, monkeypatch, lines=25, chatter=0, stall_s=2)
    assert not timed_out and stalled == 0
