"""The real kernel path: a stock Debian kernel in QEMU swaps through netswap.

Each run attaches /dev/nbd0 inside a 128 MiB guest with the commands of
`netswap attach --print-plan`, pushes a seeded pattern of 4x the guest's RAM
through swap and reads it all back; PASS needs every page intact *and* the
kernel's own pswpout to show the pages went out. Build artefacts are cached in
.cache/lab, so only the first run downloads and builds the guest.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from .nbdserver import NETSWAP

LAB = Path(__file__).resolve().parent.parent / "deploy" / "lab" / "vm"
RAM_MIB = 128
SIZE_MIB = 4 * RAM_MIB


def lab(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [NETSWAP, "lab", "vm", "--ram", str(RAM_MIB), "--size", str(SIZE_MIB), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1000)


def assert_swapped(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert ": PASS" in result.stdout
    pswpout = int(re.search(r"pswpout (\d+) pages", result.stdout).group(1))  # type: ignore[union-attr]
    pages = int(re.search(r"verified (\d+)", result.stdout).group(1))  # type: ignore[union-attr]
    assert pages == SIZE_MIB * 256
    assert pswpout >= (SIZE_MIB - RAM_MIB) * 256


@pytest.mark.timeout(1000)
def test_kernel_swaps_4x_ram_through_the_embedded_store() -> None:
    assert_swapped(lab("--backend", "memory", "--timeout", "600"))


@pytest.mark.timeout(1000)
def test_kernel_swaps_4x_ram_through_the_agent_with_two_replicated_stores() -> None:
    assert_swapped(
        lab("--backend", "remote", "--stores", "2", "--replicas", "2", "--timeout", "800")
    )


@pytest.mark.timeout(1000)
def test_kernel_swaps_4x_ram_through_a_write_back_agent() -> None:
    """cache=writeback: the kernel's swap-outs are acknowledged from the reserve."""
    assert_swapped(lab("--backend", "remote", "--stores", "1", "--cache", "writeback",
                       "--timeout", "800"))  # fmt: skip


def test_the_verifier_names_a_corrupted_page(tmp_path: Path) -> None:
    binary = tmp_path / "swaptest"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(LAB / "swaptest.c")], check=True)
    ok = subprocess.run([str(binary), "8", "7"], capture_output=True, text=True)
    assert ok.returncode == 0 and "SWAPTEST PASS pages=2048 verified=2048" in ok.stdout
    bad = subprocess.run(
        [str(binary), "8", "7"], capture_output=True, text=True, env={"SWAPTEST_CORRUPT": "1500"}
    )
    assert bad.returncode == 1
    assert "SWAPTEST FAIL page=1500 offset=1234" in bad.stdout
