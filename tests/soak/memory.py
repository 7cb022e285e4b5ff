"""Where the agent's resident memory goes, sampled through the soak (issue #29: RSS grew
+0.85 MiB per 10 min over an hour against a bound of 0.1; RSS alone cannot say where).

Every MEMORY_EVERY_S the soak reads two views of the agent (nbdkit with the plugin):
  - the kernel's: /proc/PID/smaps, every mapping's resident KiB, so that the one that
    grows is named by address, size and kind (the [heap], a glibc thread arena -- a
    64 MiB-aligned reservation --, a file, a stack, other anonymous memory: pymalloc's
    1 MiB arenas, malloc's own mmaps, uvloop's);
  - the allocators' (/debug/memory, server/ops/heapstats.py): glibc's arenas (bytes from
    the system, free in bins), pymalloc's arenas and blocks in use, tracemalloc's traced
    bytes when the agent traces.
The report fits each figure's slope over the longest-lived agent's samples after its
warm-up (the same window and fit as the RSS slope), and names the mappings that grew
most: what grows in RSS and not in the traced bytes is an allocator keeping free
memory, or memory that Python does not see.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

# A sample a minute: an hour gives 60 points per figure, and one sample costs a read of
# smaps (a few hundred mappings) and malloc_info over the agent's arenas: milliseconds.
MEMORY_EVERY_S = 60.0
HEAP_MAX = 64 << 20  # glibc's HEAP_MAX_SIZE on 64-bit: a thread arena's reservation
KIB = 1024
MAPPINGS_SHOWN = 8


def smaps(pid: int) -> dict[str, tuple[str, int, int]]:
    """Each mapping of `pid`: {start: (kind, size KiB, resident KiB)}."""
    out: dict[str, tuple[str, int, int]] = {}
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return out
    start, kind, size = "", "", 0
    for line in text.splitlines():
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            start, size = head[0].split("-")[0], (hi - lo) // KIB
            kind = _kind(lo, hi, head[1], head[5] if len(head) > 5 else "")
        elif head[0] == "Rss:":
            out[start] = (kind, size, int(head[1]))
    return out


def _kind(lo: int, hi: int, perms: str, path: str) -> str:
    if path.startswith("/"):
        return "file"
    if path in ("[heap]", "[stack]"):
        return path.strip("[]")
    if path:
        return "kernel"  # [vdso], [vvar]
    if perms.startswith("---"):
        return "reserved"  # guard pages, an arena's unused reservation: never resident
    if lo % HEAP_MAX == 0 and hi - lo <= HEAP_MAX:
        return "thread-arena"
    return "anon"


def allocators(http: str, query: str = "") -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://{http}/debug/memory{query}", timeout=10) as r:
            body: dict[str, Any] = json.loads(r.read())
            return body
    except (OSError, ValueError):
        return {}


def trim(http: str) -> tuple[int, int]:
    """Have the agent call malloc_trim(0): its RSS (KiB) before and after; zeros if it
    could not say."""
    t = allocators(http, "?trim=1").get("trim", {})
    return t.get("rss_before_kib", 0), t.get("rss_after_kib", 0)


def sample(t: float, pid: int, http: str) -> dict[str, Any]:
    return {"t": t, "pid": pid, "maps": smaps(pid), "alloc": allocators(http)}


def figures(s: dict[str, Any]) -> dict[str, float]:
    """One sample's figures, in KiB: resident by kind of mapping, then the allocators'."""
    out: dict[str, float] = {}
    for kind, _size, rss in s["maps"].values():
        out[f"rss {kind}"] = out.get(f"rss {kind}", 0) + rss
    out["rss total"] = sum(rss for _k, _s, rss in s["maps"].values())
    a = s["alloc"]
    if m := a.get("malloc"):
        out["malloc from system (arenas)"] = m["system"] / KIB
        out["malloc free in arenas"] = m["free"] / KIB
        out["malloc in use (system - free)"] = (m["system"] - m["free"]) / KIB  # #29: flat
        out["malloc mmap'd chunks"] = m["mmap"] / KIB
        out["malloc arenas"] = len(m["arenas"])
    if p := a.get("pymalloc"):
        out["pymalloc arenas"] = p["arenas_allocated_current"] * 1024
        out["pymalloc blocks in use"] = p["bytes_in_allocated_blocks"] / KIB
        out["pymalloc free blocks"] = p["bytes_in_available_blocks"] / KIB
    if "traced_bytes" in a:
        out["traced (tracemalloc)"] = a["traced_bytes"] / KIB
        out["tracemalloc's own"] = a["tracemalloc_own"] / KIB
        out["rss outside Python (total - traced - own)"] = (  # what tracemalloc cannot see
            out["rss total"] - out["traced (tracemalloc)"] - out["tracemalloc's own"]
        )
    return out


def per_10min(t: list[float], ys: list[float]) -> float:
    """The least-squares slope of ys over t (s), per ten minutes."""
    n = len(t)
    mt, my = sum(t) / n, sum(ys) / n
    var = sum((x - mt) ** 2 for x in t)
    return sum((x - mt) * (y - my) for x, y in zip(t, ys, strict=True)) / var * 600 if var else 0.0


Row = tuple[str, float, float, float]  # a figure's name, first, last, slope per 10 min


def growth(samples: list[dict[str, Any]]) -> tuple[list[Row], list[str]]:
    """Each figure's (name, first, last, slope per 10 min), in MiB (a count as is), over
    `samples`, and the mappings that grew most, as lines."""
    if len(samples) < 2:
        return [], []
    t = [s["t"] for s in samples]
    rows = [figures(s) for s in samples]
    names = sorted({n for r in rows for n in r})
    table = []
    for n in names:
        ys = [r.get(n, 0.0) for r in rows]
        scale = 1.0 if n == "malloc arenas" else 1 / KIB
        table.append((n, ys[0] * scale, ys[-1] * scale, per_10min(t, ys) * scale))
    first, last = samples[0]["maps"], samples[-1]["maps"]
    grew = sorted(((last[a][2] - first.get(a, ("", 0, 0))[2], a) for a in last), reverse=True)
    lines = [f"{kib / KIB:+8.2f} MiB  {last[a][0]:<12} at {a}: {last[a][1] / KIB:.1f} MiB "
             f"mapped, {last[a][2] / KIB:.1f} resident"
             for kib, a in grew[:MAPPINGS_SHOWN] if kib]  # fmt: skip
    return table, lines


def save(path: Path, samples: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
