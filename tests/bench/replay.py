"""Writes of real pages over NBD: libnbd's aio from a few processes (#31).

fio cannot write real memory: its buffers are random bytes, zeros, a share made
compressible by a pattern (buffer_compress_percentage), or one pattern of at
most 512 B repeated (buffer_pattern, a file included). A compressor on those
measures the pattern. So the corpus rows of `make bench-agent` write with this:
each worker process holds POOL_PAGES pages drawn from the corpus
(`make corpus`, .cache/corpus/) as ready libnbd buffers, keeps its share of
the queue depth in flight on its own connection, and counts completions and
their latency over the window, after a ramp, as fio does. A random-content pool
(os.urandom) is there to set the tool against fio on the same rows.

`python -m tests.bench.replay` measures the tool's own ceiling against
`nbdkit memory`, beside fio, on the corpus rows' shapes: which process count
keeps the client from being what a row measures.
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import queue
import random
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import nbd

from ..corpus.generate import DEFAULT_DIR, read_manifest
from .fio import RAMP_S

PAGE = 4096
# Pages each worker holds ready (64 MiB): a uniform draw large enough that its mean
# lz4 cost is the corpus's, small enough for three workers beside the servers.
POOL_PAGES = 16384


@dataclass(frozen=True)
class Job:
    uri: str
    pages: int  # per request
    depth: int  # in flight, over all processes
    seconds: float
    content: str = "corpus"  # corpus | random | zero
    first: int = 0  # the span written, in pages
    count: int = 0  # 0: to the export's end
    procs: int = 2
    seed: int = 0


@dataclass
class Outcome:
    iops: float
    p50_us: float
    p99_us: float
    cpu_us: float  # the workers' CPU per request (user + system)
    lat: list[float] = field(default_factory=list, repr=False)


def corpus_pages(directory: Path = DEFAULT_DIR) -> list[memoryview]:
    """Every corpus page, as views over its file's mapping (read-only)."""
    manifest = read_manifest(directory)
    if not manifest:
        raise FileNotFoundError(f"no corpus in {directory}: run `make corpus` (as root)")
    pages: list[memoryview] = []
    for name in manifest:
        with open(directory / f"{name}.pages", "rb") as f:
            data = memoryview(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
        pages += [data[i : i + PAGE] for i in range(0, len(data), PAGE)]
    return pages


def pool(content: str, pages: int, seed: int) -> list[nbd.Buffer]:
    """Buffers of `pages` pages each, POOL_PAGES pages in all, drawn by seed."""
    rng = random.Random(seed)
    if content == "corpus":
        every = corpus_pages()
        chosen = [every[i] for i in rng.sample(range(len(every)), POOL_PAGES)]
    elif content == "random":
        chosen = [memoryview(os.urandom(PAGE)) for _ in range(POOL_PAGES)]
    else:
        chosen = [memoryview(bytes(PAGE))] * POOL_PAGES
    return [nbd.Buffer.from_bytearray(bytearray(b"".join(chosen[i : i + pages])))
            for i in range(0, POOL_PAGES - pages + 1, pages)]  # fmt: skip


def _span(h: nbd.NBD, job: Job) -> tuple[int, int]:
    count = job.count or h.get_size() // PAGE - job.first
    return job.first, count // job.pages


def _worker(job: Job, index: int, ready: Barrier, out: Queue[tuple[list[float], float]]) -> None:
    bufs = pool(job.content, job.pages, job.seed * 1000 + index)
    depth = job.depth // job.procs + (index < job.depth % job.procs)
    h = nbd.NBD()
    h.connect_uri(job.uri)
    first, slots = _span(h, job)
    rng = random.Random(job.seed * 1000 + index + 1)
    offsets = [(first + rng.randrange(slots) * job.pages) * PAGE for _ in range(1 << 16)]
    ready.wait()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    clock = time.perf_counter
    began = clock()
    counted_from, until = began + RAMP_S, began + RAMP_S + job.seconds
    inflight: dict[int, float] = {}
    lat: list[float] = []
    i = 0
    while True:
        now = clock()
        if now >= until:
            break
        while len(inflight) < depth:
            cookie = h.aio_pwrite(bufs[i % len(bufs)], offsets[i & 0xFFFF])
            inflight[cookie] = clock()
            i += 1
        h.poll(-1)
        while inflight and (cookie := h.aio_peek_command_completed()):
            h.aio_command_completed(cookie)  # raises on an error reply
            done = clock()
            sent = inflight.pop(cookie)
            if counted_from <= done < until:
                lat.append(done - sent)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    while inflight:
        h.poll(-1)
        while inflight and (cookie := h.aio_peek_command_completed()):
            h.aio_command_completed(cookie)
            del inflight[cookie]
    h.shutdown()
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    out.put((lat, cpu))


def run(job: Job) -> Outcome:
    """The job's writes from job.procs processes at once; what they measured."""
    ctx = mp.get_context("spawn")  # the caller holds threads (servers, a cluster)
    ready, out = ctx.Barrier(job.procs), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(job, i, ready, out)) for i in range(job.procs)]
    for p in procs:
        p.start()
    parts: list[tuple[list[float], float]] = []
    deadline = time.monotonic() + job.seconds + 120
    while len(parts) < len(procs):
        try:
            parts.append(out.get(timeout=1))
        except queue.Empty:
            if any(p.exitcode for p in procs) or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"replay: a worker failed or hung on {job}") from None
    for p in procs:
        p.join(30)
        if p.exitcode != 0:
            raise RuntimeError(f"replay worker exited {p.exitcode} on {job}")
    lat = sorted(x for part, _ in parts for x in part)
    if not lat:
        raise RuntimeError(f"replay: no write completed in the window on {job}")
    cpu = sum(c for _, c in parts)
    return Outcome(
        iops=len(lat) / job.seconds,
        p50_us=lat[len(lat) // 2] * 1e6,
        p99_us=lat[min(len(lat) - 1, len(lat) * 99 // 100)] * 1e6,
        cpu_us=cpu / len(lat) * 1e6,
    )


def prefill(uri: str, content: str, first: int = 0, count: int = 0, seed: int = 0) -> int:
    """Write a span once, in order, 1 MiB at a time (4 in flight): corpus pages in a
    seeded order (slot i of the span gets the i-th page of a shuffle of the whole
    corpus), zeros, or random bytes. The pages written."""
    h = nbd.NBD()
    h.connect_uri(uri)
    count = count or h.get_size() // PAGE - first
    if content == "corpus":
        every = corpus_pages()
        order = list(range(len(every)))
        random.Random(seed).shuffle(order)
        page = [every[order[i % len(order)]] for i in range(count)]
    chunk = 256
    inflight: list[int] = []
    for at in range(0, count, chunk):
        n = min(chunk, count - at)
        if content == "corpus":
            data = b"".join(page[at : at + n])
        else:
            data = bytes(n * PAGE) if content == "zero" else os.urandom(n * PAGE)
        inflight.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)),
                                     (first + at) * PAGE))  # fmt: skip
        while len(inflight) >= 4:
            h.poll(-1)
            inflight = [c for c in inflight if not h.aio_command_completed(c)]
    while inflight:
        h.poll(-1)
        inflight = [c for c in inflight if not h.aio_command_completed(c)]
    h.shutdown()
    return count


SHAPES = ((1, 32), (16, 32), (32, 8))  # (pages per request, depth): the corpus rows


def ceiling(procs: Sequence[int], rounds: int, seconds: float) -> None:
    """The tool against nbdkit memory, beside fio, alternating, medians."""
    from ..conftest import free_port
    from .bench_nbd import peer_cmd, server
    from .fio import Workload, fio

    port = free_port()
    with server(peer_cmd(port), port) as uri:
        rows: dict[str, list[tuple[float, float]]] = {}
        for _ in range(rounds):
            for pages, depth in SHAPES:
                work = Workload("", "randwrite", f"{pages * 4}k", depth)
                r = fio(uri, work, "256M", seconds)
                rows.setdefault(f"{pages * 4}K QD{depth} fio", []).append((r.iops, r.cpu_us))
                for n in procs:
                    o = run(Job(uri, pages, depth, seconds, procs=n))
                    key = f"{pages * 4}K QD{depth} replay x{n}"
                    rows.setdefault(key, []).append((o.iops, o.cpu_us))
    print(f"against nbdkit memory, corpus pages, medians of {rounds} rounds, "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"{'shape':<26}{'requests/s':>12}{'pages/s':>10}{'client CPU us/req':>19}")
    for key, runs in rows.items():
        iops = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        pages = int(key.split("K")[0]) // 4
        print(f"{key:<26}{iops:>12,.0f}{iops * pages:>10,.0f}{cpu:>19.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.replay", description=__doc__)
    parser.add_argument("--procs", default="1,2,3", help="process counts to try")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtime", type=float, default=4)
    args = parser.parse_args()
    ceiling([int(n) for n in args.procs.split(",")], args.rounds, args.runtime)


if __name__ == "__main__":
    main()
