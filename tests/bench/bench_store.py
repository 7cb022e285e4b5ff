"""make bench-store: swap_out/swap_in through the real client and server on loopback.

Pages/s: steady-state pages/s and MiB/s (medians of PASSES, after a pass that
faults the arena in) for one page per RPC against batches of 32 (both with 32
requests in flight), through StoreClient against a store process; then the
same with payloads of the corpus's lengths (CORPUS_LENGTHS: what the agent
sends of real memory, compressed, a same-filled page as its word), a page per
payload in pages/s and the payloads' bytes in MiB/s.

Round trips: one 4 KiB SwapIn at a time, p50/p99 of ROUND_TRIPS, through
StoreClient (the agent's loop path) and through BlockingClient (the path of
a lone swap-in on nbdkit's thread), each against the floor: the same bytes
(a SwapIn frame out, a one-page Pages frame back) between a blocking Python
client and a Python echo server on uvloop doing nothing else. Every row is
measured under two placements, because a wake-up across CPUs costs ~40 µs a
side in this VM (an IPI is a VM exit) and swamps everything else: both
processes pinned to one CPU, and client and server pinned to two different
CPUs. The ratio that matters is each row against the floor of its own
placement. Then the memory backend's bytes of index per page.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from array import array
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from netswap.client.rpc import BlockingClient, StoreClient
from netswap.protocol import PAGE_SIZE, SwapIn, area_seed, prove_reply
from netswap.server.backends import MemoryBackend
from netswap.server.heap import tune_heap

from ..conftest import free_port, wait_for_port

PAGES = 32768  # 128 MiB moved per run
IN_FLIGHT = 32
PASSES = 5
ROUND_TRIPS = 4000  # ~0.5 s each: enough for a steady p99 on loopback
# Payload lengths the agent sends for the corpus of real memory, and how many pages of
# its 81,920 had each (python -m tests.bench.size_classes: lz4, 256-B granules, whole
# above 3,072 B, a same-filled page as its 8-byte word).
CORPUS_LENGTHS = {8: 1796, 256: 2755, 512: 3144, 768: 4079, 1024: 7919, 1280: 8812,
                  1536: 9506, 1792: 10653, 2048: 9083, 2304: 10202, 2560: 6908, 2816: 4043,
                  3072: 1248, 4096: 1772}  # fmt: skip
REQUEST = 4 + 8 + 8  # a one-slot SwapIn frame: length, head, first slot (a run)
REPLY = 4 + 8 + 8 + 4 + PAGE_SIZE  # a one-page Pages frame: length, head, gen, tag, page
# The floor's server: a uvloop asyncio.Protocol that answers every REQUEST-byte
# request with a REPLY-byte frame, nothing else.
ECHO = f"""
import asyncio, sys, uvloop
REQUEST, reply = {REQUEST}, bytes({REPLY})
class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.t, self.held = transport, 0
    def data_received(self, data):
        self.held += len(data)
        while self.held >= REQUEST:
            self.held -= REQUEST
            self.t.write(reply)
async def main():
    server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
uvloop.run(main())
"""


async def run(port: int, batch: int, mixed: bool = False) -> tuple[float, float]:
    client = await StoreClient.connect("127.0.0.1", port, f"bench{batch}{'m' * mixed}")
    await client.swapfile(True, PAGES)
    data: bytes | list[bytes] = os.urandom(batch * PAGE_SIZE)
    sem = asyncio.Semaphore(IN_FLIGHT)
    if mixed:  # a batch's payloads drawn from the corpus's lengths
        rng = random.Random(batch)
        lengths = rng.sample(list(CORPUS_LENGTHS), batch, counts=list(CORPUS_LENGTHS.values()))
        data = [os.urandom(n) for n in lengths]

    async def one(op: str, first: int, write: int) -> None:
        async with sem:
            slots = range(first, first + batch)
            if op == "out":  # each pass a newer write: the store keeps only newer pages
                await client.swap_out(slots, data, [write] * batch)
            else:
                await client.swap_in(slots, [write] * batch)

    # The first pass faults the store's arena in; then out and in alternate PASSES
    # times and each figure is the median pass (single passes vary by +-40 % here).
    rates: dict[str, list[float]] = {"out": [], "in": []}
    write = 0
    for op in ("out", *(("out", "in") * PASSES)):
        write += op == "out"
        start = time.perf_counter()
        await asyncio.gather(*(one(op, first, write) for first in range(0, PAGES, batch)))
        rates[op].append(PAGES / (time.perf_counter() - start))
    await client.close()
    return statistics.median(rates["out"][1:]), statistics.median(rates["in"])


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 in µs."""
    samples.sort()
    return samples[len(samples) // 2] * 1e6, samples[len(samples) * 99 // 100] * 1e6


def timed(call: Callable[[], object]) -> tuple[float, float]:
    samples = []
    for _ in range(ROUND_TRIPS):
        began = time.perf_counter()
        call()
        samples.append(time.perf_counter() - began)
    return percentiles(samples)


def echo_round_trips(port: int) -> tuple[float, float]:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request, reply = bytes(REQUEST), memoryview(bytearray(REPLY))

    def once() -> None:
        sock.sendall(request)
        got = 0
        while got < REPLY:
            got += sock.recv_into(reply[got:])

    try:
        return timed(once)
    finally:
        sock.close()


async def store_client_round_trips(port: int) -> tuple[float, float]:
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


def blocking_round_trips(port: int) -> tuple[float, float]:
    """The lone swap-in's client and proof (direct.py), without an agent."""
    client = BlockingClient.open("127.0.0.1", port, "rtt", "", 5.0)
    seed, counts, slots = area_seed("rtt"), array("I", [1]), range(0, 1)

    def once() -> None:
        reply = client.call(SwapIn(client.next_id(), slots), 5.0)
        assert prove_reply(seed, reply, slots, array("Q", counts)) is None

    try:
        return timed(once)
    finally:
        client.close()


@contextmanager
def pinned(cmd: list[str], cpu: int, port: int) -> Iterator[None]:
    proc = subprocess.Popen(["taskset", "-c", str(cpu), *cmd], stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
        yield
    finally:
        proc.terminate()
        proc.wait()


def round_trips(netswap: str) -> dict[str, dict[str, tuple[float, float]]]:
    """Each row under both placements: {placement: {row: (p50, p99)}}."""
    import uvloop

    cpus = sorted(os.sched_getaffinity(0))
    placements = {"one CPU": (cpus[0], cpus[0])}
    if len(cpus) > 1:
        placements["two CPUs"] = (cpus[0], cpus[1])
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for name, (mine, theirs) in placements.items():
        os.sched_setaffinity(0, {mine})
        rows: dict[str, tuple[float, float]] = {}
        port = free_port()
        with pinned([sys.executable, "-c", ECHO, str(port)], theirs, port):
            rows["uvloop echo (floor)"] = echo_round_trips(port)
        port = free_port()
        store = [netswap, "store", "--listen", f"127.0.0.1:{port}", "--capacity", "64M"]
        with pinned(store, theirs, port):
            rows["StoreClient + store"] = uvloop.run(store_client_round_trips(port))
            rows["BlockingClient + store"] = blocking_round_trips(port)
        out[name] = rows
    os.sched_setaffinity(0, set(cpus))
    return out


def print_round_trips(placements: dict[str, dict[str, tuple[float, float]]]) -> None:
    print(f"\none 4 KiB SwapIn round trip, {ROUND_TRIPS} in turn:")
    print(f"{'placement':<10}{'':>24} {'p50 µs':>8} {'p99 µs':>8} {'p50 / floor':>12}")
    for placement, rows in placements.items():
        floor = rows["uvloop echo (floor)"][0]
        for name, (p50, p99) in rows.items():
            print(f"{placement:<10}{name:>24} {p50:>8.1f} {p99:>8.1f} {p50 / floor:>11.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench_store", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--no-mixed",
        dest="mixed",
        action="store_false",
        help="whole pages only (a store of protocol 4 before payloads)",
    )
    parser.add_argument("--no-round-trips", dest="round_trips", action="store_false")
    args = parser.parse_args()
    tune_heap()  # as the agent does in nbdkit (server/heap.py); the store does its own
    port = free_port()
    netswap = str(Path(sys.executable).parent / "netswap")
    proc = subprocess.Popen(
        [netswap, "store", "--listen", f"127.0.0.1:{port}", "--capacity", "1G"],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc)
        import uvloop

        results = {b: uvloop.run(run(port, b)) for b in (1, 32)}
        mixed = {b: uvloop.run(run(port, b, True)) for b in (1, 32)} if args.mixed else {}
    finally:
        proc.terminate()
        proc.wait()
    placements = round_trips(netswap) if args.round_trips else {}
    mib = PAGE_SIZE / 2**20
    print(
        f"{'batch':>6} {'swap_out pages/s':>17} {'MiB/s':>8} {'swap_in pages/s':>16} {'MiB/s':>8}"
    )
    for batch, (out, inn) in results.items():
        print(f"{batch:>6} {out:>17,.0f} {out * mib:>8.1f} {inn:>16,.0f} {inn * mib:>8.1f}")
    o1, i1 = results[1]
    o32, i32 = results[32]
    print(f"batch 32 / batch 1: swap_out {o32 / o1:.1f}x, swap_in {i32 / i1:.1f}x")
    mean = sum(n * c for n, c in CORPUS_LENGTHS.items()) / sum(CORPUS_LENGTHS.values()) / 2**20
    for batch, (out, inn) in mixed.items():
        print(f"{f'{batch} mix':>6} {out:>17,.0f} {out * mean:>8.1f} {inn:>16,.0f} "
              f"{inn * mean:>8.1f}   (payloads of the corpus's lengths, mean "
              f"{mean * 2**20:,.0f} B)")  # fmt: skip
    if placements:
        print_round_trips(placements)

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
