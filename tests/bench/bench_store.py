"""make bench-store: swap_out/swap_in through the real client and server on loopback.

Prints steady-state pages/s and MiB/s (medians of PASSES, after a pass that faults the arena in)
for one page per RPC against batches of 32 (both with 32 requests in flight),
and the memory backend's bytes of index per page. The server runs in its own
process (uvloop) so client and server do not share a GIL.

Then one 4 KiB SwapIn at a time, p50/p99 of ROUND_TRIPS round trips: through
StoreClient (the agent's loop path) and through the blocking connection that
lone swap-ins use (client/agent/direct.py), each against the floor: a raw TCP
round trip of the same sizes (16 bytes out, 4 KiB back) between two Python
processes doing nothing else, measured in the same run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from netswap.client.rpc import StoreClient
from netswap.protocol import PAGE_SIZE
from netswap.server.backends import MemoryBackend
from netswap.server.heap import tune_heap

from ..conftest import free_port, wait_for_port

PAGES = 32768  # 128 MiB moved per run
IN_FLIGHT = 32
PASSES = 5
ROUND_TRIPS = 4000  # ~0.5 s each: enough for a steady p99 on loopback
# The floor's server: answers every 16-byte request with a 4 KiB page.
RAW_SERVER = """
import socket, sys
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
page, request = bytes(4096), bytearray(16)
while True:  # the first connection is wait_for_port's probe
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while conn.recv_into(request, 16, socket.MSG_WAITALL) == 16:
        conn.sendall(page)
    conn.close()
"""


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

    # The first pass faults the store's arena in; then out and in alternate PASSES
    # times and each figure is the median pass (single passes vary by +-40 % here).
    rates: dict[str, list[float]] = {"out": [], "in": []}
    for op in ("out", *(("out", "in") * PASSES)):
        start = time.perf_counter()
        await asyncio.gather(*(one(op, first) for first in range(0, PAGES, batch)))
        rates[op].append(PAGES / (time.perf_counter() - start))
    await client.close()
    return statistics.median(rates["out"][1:]), statistics.median(rates["in"])


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 in µs."""
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[len(samples) * 99 // 100] * 1e6


def raw_round_trips() -> tuple[float, float]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", RAW_SERVER, str(port)])
    try:
        wait_for_port(port, proc)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        page, samples = bytearray(PAGE_SIZE), []
        for _ in range(ROUND_TRIPS):
            began = time.perf_counter()
            sock.sendall(b"r" * 16)
            got = 0
            while got < PAGE_SIZE:
                got += sock.recv_into(memoryview(page)[got:])
            samples.append(time.perf_counter() - began)
        sock.close()
    finally:
        proc.kill()
        proc.wait()
    return percentiles(samples)


async def client_round_trips(port: int) -> tuple[float, float]:
    client = await StoreClient.connect("127.0.0.1", port, "rtt")
    await client.swapfile(True, 1)
    await client.swap_out([0], os.urandom(PAGE_SIZE))
    samples = []
    for _ in range(ROUND_TRIPS):
        began = time.perf_counter()
        await client.swap_in([0])
        samples.append(time.perf_counter() - began)
    await client.close()
    return percentiles(samples)


def direct_round_trips(port: int) -> tuple[float, float]:
    """The lone swap-in's own connection and proof (direct.py), without an agent."""
    from netswap.client.agent.direct import _Conn
    from netswap.client.rpc import check_pages
    from netswap.protocol import SwapIn, area_seed

    ctx = SimpleNamespace(io_timeout=5.0, tls=None, area="rtt", token="")
    conn = _Conn.open(ctx, "127.0.0.1", port)  # type: ignore[arg-type]
    seed, samples = area_seed("rtt"), []
    for _ in range(ROUND_TRIPS):
        began = time.perf_counter()
        reply = conn.call(SwapIn(conn.next_id(), (0,)), 5.0)
        assert check_pages(seed, reply, (0,), b"\x01", None) is None
        samples.append(time.perf_counter() - began)
    conn.close()
    return percentiles(samples)


def measure_round_trips(port: int) -> dict[str, tuple[float, float]]:
    import uvloop

    return {
        "raw TCP (floor)": raw_round_trips(),
        "StoreClient + store": uvloop.run(client_round_trips(port)),
        "direct path + store": direct_round_trips(port),
    }


def print_round_trips(rows: dict[str, tuple[float, float]]) -> None:
    raw = rows["raw TCP (floor)"]
    print(f"\none 4 KiB SwapIn round trip, {ROUND_TRIPS} in turn:")
    print(f"{'':>22} {'p50 µs':>8} {'p99 µs':>8} {'p50 / raw':>10}")
    for name, (p50, p99) in rows.items():
        print(f"{name:>22} {p50:>8.1f} {p99:>8.1f} {p50 / raw[0]:>9.2f}x")


def main() -> None:
    tune_heap()  # as the agent does in nbdkit (server/heap.py); the store does its own
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
        round_trips = measure_round_trips(port)
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
    print_round_trips(round_trips)

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
