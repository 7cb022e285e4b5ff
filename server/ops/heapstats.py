"""What this process's allocators hold: the ops endpoint's /debug/memory, for the soak.

RSS alone cannot say whether memory grows because Python keeps more objects or because
an allocator keeps free memory it does not return. So this asks each allocator, each a
cheap call that walks its own bookkeeping and allocates nothing large (safe to call
every minute, unlike a tracemalloc snapshot, which holds the loop for seconds):
  - glibc's malloc_info(3), read from a memory stream: every arena's bytes from the
    system and its free bytes (fragmentation is the free bytes an arena cannot return);
  - pymalloc's own statistics (_PyObject_DebugMallocStats, the text of
    sys._debugmallocstats, read from a memory stream instead of stderr): its 1 MiB
    arenas, the bytes in blocks in use and free;
  - tracemalloc's traced bytes and its own memory, when it traces.
A libc or an interpreter without these calls gives the figures it can (an empty dict).
pymalloc's figures are empty while tracemalloc traces: CPython reports nothing when its
object allocator is wrapped (_PyMem_PymallocEnabled is false).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import sys
from typing import Any

_ATTR = re.compile(r'(\w+)="([^"]*)"')
_HEAP = re.compile(r'<heap nr="(\d+)">(.*?)</heap>', re.S)
_PYMALLOC = re.compile(r"^# ([a-z ]+?)\s*=\s*([\d,]+)$", re.M)


@functools.cache  # once: every CDLL builds a class of its own (a minute's sample grew
def _libc() -> Any:  # the traced bytes by ~1 KiB when each call made one)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.open_memstream.restype = ctypes.c_void_p
    libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_void_p),
                                    ctypes.POINTER(ctypes.c_size_t)]  # fmt: skip
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


def _read_stream(write: Any) -> str:
    """Call write(FILE *) on an open_memstream(3) and return what it wrote."""
    libc = _libc()
    buf, size = ctypes.c_void_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    if not stream:
        return ""
    try:
        write(stream)
    finally:
        libc.fclose(stream)
    try:
        return ctypes.string_at(buf.value, size.value).decode() if buf.value else ""
    finally:
        libc.free(buf)


def malloc_arenas() -> dict[str, Any]:
    """glibc's arenas: [{nr, system, free}] and the totals, mmap'd chunks included."""
    try:
        libc = _libc()
        text = _read_stream(lambda stream: libc.malloc_info(0, stream))
    except (OSError, AttributeError):
        return {}
    arenas = []
    for nr, body in _HEAP.findall(text):
        arenas.append({"nr": int(nr), **_sums(body)})
    tail = text[text.rfind("</heap>") :]
    return {"arenas": arenas, **_sums(tail)}


def _sums(xml: str) -> dict[str, int]:
    """Bytes from the system now, free in bins (fast and rest), and in mmap'd chunks."""
    out = {"system": 0, "free": 0, "mmap": 0}
    for tag in re.findall(r"<(?:total|system)\s[^>]*/>", xml):
        attrs = dict(_ATTR.findall(tag))
        kind, size = attrs.get("type"), int(attrs.get("size", "0"))
        if tag.startswith("<system") and kind == "current":
            out["system"] = size
        elif kind in ("fast", "rest"):
            out["free"] += size
        elif kind == "mmap":
            out["mmap"] = size
    return out


@functools.cache
def _pymalloc_dump() -> Any:
    try:
        dump = ctypes.pythonapi._PyObject_DebugMallocStats
    except AttributeError:
        try:  # an embedding host (nbdkit) loads libpython privately: ask the library
            name = f"libpython{sys.version_info[0]}.{sys.version_info[1]}.so.1.0"
            dump = ctypes.PyDLL(name)._PyObject_DebugMallocStats
        except (OSError, AttributeError):
            return None
    dump.argtypes = [ctypes.c_void_p]
    return dump


def pymalloc() -> dict[str, int]:
    """pymalloc's counters: arenas allocated now, bytes in blocks in use and free, ..."""
    dump = _pymalloc_dump()
    if dump is None:
        return {}
    text = _read_stream(dump)
    return {k.replace(" ", "_"): int(v.replace(",", "")) for k, v in _PYMALLOC.findall(text)}


def memory() -> dict[str, Any]:
    import tracemalloc

    body: dict[str, Any] = {"malloc": malloc_arenas(), "pymalloc": pymalloc(),
                            "allocated_blocks": sys.getallocatedblocks()}  # fmt: skip
    if tracemalloc.is_tracing():
        body["traced_bytes"], body["traced_peak"] = tracemalloc.get_traced_memory()
        body["tracemalloc_own"] = tracemalloc.get_tracemalloc_memory()
    return body


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:  # in pages
        return int(f.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


def trim() -> dict[str, int]:
    """malloc_trim(0): every arena's free pages back to the kernel. What RSS was before
    and after (KiB) says how much of it was memory malloc held free, not memory in use.
    The soak calls it once, at its end; it walks every arena under its lock, so it is
    never called on a schedule."""
    try:
        libc = _libc()
    except (OSError, AttributeError):
        return {}
    before = _rss_kib()
    libc.malloc_trim(0)
    return {"rss_before_kib": before, "rss_after_kib": _rss_kib()}
