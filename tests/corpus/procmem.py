"""Read the anonymous pages of a live process: the pages its kernel could swap.

/proc/PID/maps lists the mappings; /proc/PID/pagemap says, for each 4 KiB page,
whether it is in RAM (bit 63, with its frame number) or swapped (bit 62), and
whether it is file-backed or shared (bit 61); /proc/kpageflags says, per frame,
whether it is anonymous (KPF_ANON) or the kernel's shared zero page
(KPF_ZERO_PAGE). A page is taken when it sits in a private mapping and is either
swapped and not shared, or in RAM, anonymous and not the zero page. That is the
heap, the stacks, anonymous mmaps and the copy-on-write pages of private file
mappings (a library's .data once written): what reclaim sends to swap.

Skipped, on purpose: untouched pages, and pages that only map the zero page
(read, never written). The kernel never swaps either, and reading them through
/proc/PID/mem would return zeros that inflate the zero-page share. Shared
mappings (shmem) are skipped too: they reach swap through shmem, not as the
anonymous memory this corpus stands for.

The process is stopped (SIGSTOP) while it is read, so the page list and the
contents are one snapshot. Reservoir sampling keeps at most `cap` pages, drawn
uniformly over all eligible pages, in memory bounded by `cap`.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

PAGE = 4096
PRESENT, SWAPPED, FILE_OR_SHARED = 1 << 63, 1 << 62, 1 << 61
PFN_MASK = (1 << 55) - 1
KPF_ANON, KPF_ZERO_PAGE = 1 << 12, 1 << 24
# Kernel-provided mappings: no process data, and [vsyscall] lies outside what pagemap covers.
SPECIAL = ("[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]")
# Pagemap entries read per call: 4096 x 8 B = 32 KiB of buffer, 16 MiB of address space.
CHUNK = 4096
# Pages read from /proc/PID/mem per call when their addresses run on (1 MiB of buffer).
RUN = 256


@dataclass
class Sample:
    """The pages taken from one process, and what was seen around them."""

    pid: int
    pages: bytes  # len(pages) // PAGE pages, in address order
    eligible: int  # anonymous pages in RAM or swap when the process was read
    swapped: int  # of which in swap (RssAnon counts the others)
    zero_mapped: int  # pages that only mapped the zero page (skipped)
    unreadable: int  # eligible pages /proc/PID/mem refused (counted, never guessed)
    rss_anon_kib: int  # RssAnon from /proc/PID/status, for comparison with `eligible`


def private_mappings(pid: int) -> Iterator[tuple[int, int, str]]:
    """(start, end, name) of each private mapping of pid, special ones left out."""
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            name = fields[5].strip() if len(fields) > 5 else ""
            if "p" not in fields[1] or name in SPECIAL:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            yield start, end, name


def anonymous_pages(pid: int, counts: dict[str, int]) -> Iterator[int]:
    """Address of every anonymous page of pid in RAM or swap; counts what else it met."""
    with (
        open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap,
        open("/proc/kpageflags", "rb", buffering=0) as kflags,
    ):
        for start, end, _name in private_mappings(pid):
            for chunk in range(start, end, CHUNK * PAGE):
                n = min(CHUNK, (end - chunk) // PAGE)
                raw = os.pread(pagemap.fileno(), n * 8, chunk // PAGE * 8)
                for i, entry in enumerate(struct.unpack(f"{len(raw) // 8}Q", raw)):
                    if entry & SWAPPED:
                        if not entry & FILE_OR_SHARED:
                            counts["swapped"] += 1
                            yield chunk + i * PAGE
                        continue
                    if not entry & PRESENT:
                        continue
                    pfn = entry & PFN_MASK
                    (flags,) = struct.unpack("Q", os.pread(kflags.fileno(), 8, pfn * 8))
                    if flags & KPF_ZERO_PAGE:
                        counts["zero_mapped"] += 1
                    elif flags & KPF_ANON and not entry & FILE_OR_SHARED:
                        yield chunk + i * PAGE


def reservoir(addresses: Iterator[int], cap: int, rng: random.Random) -> tuple[list[int], int]:
    """A uniform sample of at most cap addresses (Algorithm R), and how many there were."""
    kept: list[int] = []
    seen = 0
    for address in addresses:
        seen += 1
        if len(kept) < cap:
            kept.append(address)
        else:
            j = rng.randrange(seen)
            if j < cap:
                kept[j] = address
    return sorted(kept), seen


def read_pages(pid: int, addresses: list[int]) -> tuple[bytes, int]:
    """The contents of the given (sorted) pages, in runs; pages the kernel refuses are left out."""
    out = bytearray()
    unreadable = 0
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        i = 0
        while i < len(addresses):
            j = i + 1
            while j < len(addresses) and j - i < RUN and addresses[j] == addresses[j - 1] + PAGE:
                j += 1
            try:
                data = os.pread(mem.fileno(), (j - i) * PAGE, addresses[i])
            except OSError:
                data = b""
            whole = len(data) // PAGE * PAGE
            out += data[:whole]
            unreadable += (j - i) - whole // PAGE
            i = j
    return bytes(out), unreadable


def rss_anon_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


@contextmanager
def stopped(pid: int, timeout: float = 5.0) -> Iterator[None]:
    """pid held in SIGSTOP for the duration (one consistent snapshot), continued after."""
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state in ("T", "t"):
                break
            time.sleep(0.005)
        else:
            raise TimeoutError(f"process {pid} did not stop within {timeout:.0f} s")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def sample(pid: int, cap: int, seed: int = 0) -> Sample:
    """At most cap anonymous pages of pid, drawn uniformly, read while pid is stopped."""
    counts = {"zero_mapped": 0, "swapped": 0}
    with stopped(pid):
        rss = rss_anon_kib(pid)
        addresses, eligible = reservoir(anonymous_pages(pid, counts), cap, random.Random(seed))
        pages, unreadable = read_pages(pid, addresses)
    return Sample(pid, pages, eligible, counts["swapped"], counts["zero_mapped"], unreadable, rss)
