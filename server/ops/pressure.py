"""Reading the host's memory pressure: PSI and MemAvailable against watermarks.

Sources: /proc/pressure/memory (PSI, Linux >= 4.20: share of time some task
stalled on memory), /proc/meminfo (MemAvailable), and the zone watermarks in
/proc/zoneinfo (min/low/high, in pages, derived from vm.min_free_kbytes). The
reads are small and periodic (the agent samples a few times a second), never
per request. Missing files (old kernels, containers) read as "no pressure".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class Pressure:
    psi_some_avg10: float  # percent of the last 10 s some task stalled on memory
    psi_full_avg10: float
    mem_available_kb: int
    watermark_min_kb: int
    watermark_low_kb: int
    watermark_high_kb: int

    @classmethod
    def calm(cls) -> Pressure:
        return cls(0.0, 0.0, 1 << 40, 0, 0, 0)


def parse_psi(text: str) -> tuple[float, float]:
    some = full = 0.0
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        fields = dict(f.split("=", 1) for f in rest.split() if "=" in f)
        value = float(fields.get("avg10", 0.0))
        if kind == "some":
            some = value
        elif kind == "full":
            full = value
    return some, full


def parse_meminfo(text: str) -> int:
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])
    return 1 << 40


def parse_watermarks(text: str, page_kb: int = 4) -> tuple[int, int, int]:
    """Sum of every zone's min/low/high watermarks, in KiB."""
    totals = {"min": 0, "low": 0, "high": 0}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in totals and parts[1].isdigit():
            totals[parts[0]] += int(parts[1]) * page_kb
    return totals["min"], totals["low"], totals["high"]


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def sample(proc: Path = PROC) -> Pressure:
    some, full = parse_psi(_read(proc / "pressure" / "memory"))
    available = parse_meminfo(_read(proc / "meminfo"))
    wmin, wlow, whigh = parse_watermarks(_read(proc / "zoneinfo"))
    return Pressure(some, full, available, wmin, wlow, whigh)
