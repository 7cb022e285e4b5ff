"""The host's memory pressure and swap counters, for /metrics and the dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from netswap.client.pressure import sample


def vmstat(proc: Path = Path("/proc")) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        for line in (proc / "vmstat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name in ("pswpin", "pswpout"):
                out[name] = int(value)
    except OSError:
        pass
    return out


def host_snapshot() -> dict[str, Any]:
    p = sample()
    return {
        "pressure": {
            "some_avg10": p.psi_some_avg10,
            "full_avg10": p.psi_full_avg10,
            "mem_available_kb": p.mem_available_kb,
            "watermark_low_kb": p.watermark_low_kb,
        },
        "host": vmstat(),
    }
