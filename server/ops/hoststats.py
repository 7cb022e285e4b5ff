"""The host's memory pressure and swap counters, for /metrics and the dashboard."""

from __future__ import annotations

from pathlib import Path

from .pressure import sample
from .snapshot import HostSwap, PressureFigures


def vmstat(proc: Path = Path("/proc")) -> HostSwap:
    found: dict[str, int] = {}
    try:
        for line in (proc / "vmstat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name in ("pswpin", "pswpout"):
                found[name] = int(value)
    except OSError:
        pass
    return HostSwap(**found)


def host_figures() -> tuple[PressureFigures, HostSwap]:
    p = sample()
    pressure = PressureFigures(
        some_avg10=p.psi_some_avg10,
        full_avg10=p.psi_full_avg10,
        mem_available_kb=p.mem_available_kb,
        watermark_low_kb=p.watermark_low_kb,
    )
    return pressure, vmstat()
