"""make bench-store: swap_out/swap_in through the real client and server on loopback.

Prints steady-state pages/s and MiB/s (after a pass that faults the arena in)
for one page per RPC against batches of 32 (both with 32 requests in flight),
and the memory backend's bytes of index per page. The server runs in its own
process (uvloop) so client and server do not share a GIL.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from netswap.client.rpc import StoreClient
from netswap.protocol import PAGE_SIZE
from netswap.server.backends import MemoryBackend

from ..conftest import free_port, wait_for_port

PAGES = 32768  # 128 MiB moved per run
IN_FLIGHT = 32


async def run(port: int, batch: int) -> tuple[float, float]:
    client = await StoreClient.connect("127.0.0.1", port, f"bench{batch}")
    await client.swapfile(True, PAGES)
    data = os.urandom(batch * PAGE_SIZE)
    sem = asyncio.Semaphore(IN_FLIGHT)

    async def one(op: str, first: int) -> None:
        async with sem:
            slots = list(range(first, first + batch))
            if op == "out":
                await client.swap_out(slots, data)
            else:
                await client.swap_in(slots)

    rates = []
    # The first pass faults the store's arena in; the figures are the second pass's.
    for op in ("out", "out", "in"):
        start = time.perf_counter()
        await asyncio.gather(*(one(op, first) for first in range(0, PAGES, batch)))
        rates.append(PAGES / (time.perf_counter() - start))
    await client.close()
    return rates[1], rates[2]


def main() -> None:
    port = free_port()
    netswap = Path(sys.executable).parent / "netswap"
    proc = subprocess.Popen(
        [str(netswap), "store", "--listen", f"127.0.0.1:{port}", "--capacity", "1G"],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
        import uvloop

        results = {b: uvloop.run(run(port, b)) for b in (1, 32)}
    finally:
        proc.terminate()
        proc.wait()
    mib = PAGE_SIZE / 2**20
    print(
        f"{'batch':>6} {'swap_out pages/s':>17} {'MiB/s':>8} {'swap_in pages/s':>16} {'MiB/s':>8}"
    )
    for batch, (out, inn) in results.items():
        print(f"{batch:>6} {out:>17,.0f} {out * mib:>8.1f} {inn:>16,.0f} {inn * mib:>8.1f}")
    o1, i1 = results[1]
    o32, i32 = results[32]
    print(f"batch 32 / batch 1: swap_out {o32 / o1:.1f}x, swap_in {i32 / i1:.1f}x")

    n = 1 << 20
    backend = MemoryBackend(n)
    area = backend.activate("a", n)
    page = memoryview(bytes(PAGE_SIZE))
    for slot in range(0, n, 64):
        backend.write(area, [slot], page, None)
    per_page = backend.metadata_bytes() / n
    print(
        f"memory backend index at 1M pages: {per_page:.1f} bytes/page "
        f"({per_page / PAGE_SIZE:.3%} of the page bytes)"
    )


if __name__ == "__main__":
    main()
