"""server/heap.py: batch-sized buffers come from the heap, without page faults."""

from __future__ import annotations

import subprocess
import sys

# Frames in flight as a store or an agent holds them: received chunks, a batch's
# pages, a reply (64 KiB-1 MiB), freed out of order. Prints page faults per buffer.
WORKLOAD = """
import os, random, resource, sys
from netswap.server.heap import tune_heap
if sys.argv[1] == "tuned":
    assert tune_heap()
src, rng, held = os.urandom(1 << 20), random.Random(1), []
def step():
    held.append(bytes(src[: rng.choice((64, 128, 256, 1024)) * 1024]))
    if len(held) > 4:
        held.pop(rng.randrange(len(held)))
for _ in range(200):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3000):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3000)
"""


def faults_per_buffer(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", WORKLOAD, mode], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return float(out.stdout)


def test_tuned_heap_reuses_batch_buffers_where_glibc_defaults_fault_them_in() -> None:
    default, tuned = faults_per_buffer("default"), faults_per_buffer("tuned")
    assert tuned < 0.5, f"{tuned} page faults per buffer with the heap tuned"
    assert default > 10 * max(tuned, 0.1), f"glibc's defaults: {default} (tuned: {tuned})"


# Threads that each malloc (bytes above pymalloc's 512): glibc gives each new thread an
# arena of its own, up to 8 per core. Prints the arenas malloc_info counts.
THREADS = """
import sys, threading
from netswap.server.heap import one_arena
from netswap.server.ops.heapstats import malloc_arenas
if sys.argv[1] == "one":
    assert one_arena()
held = []
threads = [threading.Thread(target=lambda: held.append(bytes(4096))) for _ in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(malloc_arenas()["arenas"]))
"""


def arenas(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", THREADS, mode], capture_output=True, text=True,
                         check=True)  # fmt: skip
    return int(out.stdout)


def test_one_arena_serves_every_thread() -> None:
    """The agent's threads share one heap (heap.one_arena): a burst freed in one thread's
    arena is not kept there for it alone (#29's hour soak)."""
    assert arenas("default") > 1, "glibc's default: an arena per new thread"
    assert arenas("one") == 1
