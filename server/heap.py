"""The process heap: batch-sized buffers reused, not mapped and unmapped each time.

Any netswap process that moves batches (the store, the agent inside nbdkit)
allocates and frees frame-sized buffers many thousand times a second: msgpack's
bytes for a batch's pages, the reply's bytearray, the joined pages of a
SwapOut. glibc serves a block of 128 KiB or more with its own mmap and returns
it with munmap (the threshold only rises after such a free, and the heap's top
is trimmed back to the kernel past 128 KiB), so each batch paid page faults
and zeroing for fresh pages: make bench-store at batch 32 moved 95k pages/s
out and 145k in with glibc's defaults, 170-240k both ways with the thresholds
below (same run of the comparison, one store, loopback).

For the swapping host it is also the discipline the swap path asks for: a
freed batch buffer stays in the heap (and under mlockall, resident) for the
next batch, instead of each batch asking the kernel for pages while it is
short of them.

Applied with mallopt(3) at start; a libc without it (musl) keeps its own.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from netswap.protocol import MAX_FRAME_SIZE

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # <malloc.h>
# Every frame (at most MAX_FRAME_SIZE, 1.06 MiB) comes from the heap: twice it.
MMAP_THRESHOLD = 2 * MAX_FRAME_SIZE
# Free memory at the heap's top kept for reuse: a store's or an agent's frames in
# flight are a few MiB (4 batches per store link each way, links.MAX_INFLIGHT);
# beyond 8 MiB the heap is given back, so an idle process does not hold a peak.
TRIM_THRESHOLD = 8 * 1024 * 1024


def tune_heap() -> bool:
    """Set the thresholds; False when this libc has no mallopt or refused."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def one_arena() -> bool:
    """Every thread's malloc from one arena (M_ARENA_MAX 1), set before the threads start.

    glibc gives each new thread an arena of its own, up to 8 per core (16 here), and
    applies TRIM_THRESHOLD to each: every arena keeps up to 8 MiB free at its top, and
    what a burst grew in one (a resync's copies, a batch's frames on an nbdkit thread)
    serves no other thread's next batch. The hour soak (#29) saw RSS grow in memory
    freed and kept, spread over the arenas (+0.41 MiB per 10 min of malloc's free bytes,
    its bytes in use flat), the traced Python bytes flat. With one, the heap's peak is the
    process's frames in flight (heap.py's bound), once: RSS +0.05 MiB per 10 min (40 min).
    Contention costs little: the agent's threads allocate under Python's GIL, one at a
    time; the standby's cushion (grow_cushion) and the supervisor set one arena too."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_ARENA_MAX, 1))
    except (OSError, AttributeError):
        return False


# A cushion is grown in blocks below the mmap threshold, so that they come from the heap.
CUSHION_BLOCK = 1024 * 1024


def grow_cushion(size: int) -> bool:
    """Make the heap `size` bytes larger, touch it and free it again, kept: a process
    whose memory is locked as it is touched (mlockall MCL_ONFAULT) then serves its next
    `size` bytes of malloc from pages it already holds. For a standby nbdkit, which takes
    over while the host has no memory to give (client/nbd/standby.py). One arena for
    every thread (a thread's own arena would not see the cushion), and a trim threshold
    above it (glibc would hand it back). With PYTHONMALLOC=malloc, Python's small objects
    come from it too."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not (one_arena() and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD + size)):
        return False
    blocks = [bytearray(CUSHION_BLOCK) for _ in range(size // CUSHION_BLOCK)]  # zeroed: touched
    del blocks
    return True
