"""python -m tests.bench.size_classes: what the stores' size classes cost on real memory.

The corpus (tests/corpus, `make corpus`: anonymous pages of real programs) is
turned into payloads by the agent's rule -- lz4 block, a 2-byte length header,
zero-padded to 256-B granules, stored whole above 3072 B, a same-filled page as
its 8-byte word -- and then:

1. their lengths, and the bytes held per byte of payload for zspages of at most
   1..8 pages (each class at its least waste: classes.py's rule);
2. a real MemoryBackend holding them all: bytes held (arena pages in use) per
   byte of payload, and per page swapped, and metadata bytes per payload;
3. churn on that store -- random runs of slots rewritten with other corpus
   payloads or discarded -- for compaction slacks 2, 4, 8, 16 and none: bytes
   held per byte of payload (mean of samples, and the worst), and compaction's
   moves per payload written;
4. fragmentation: a store filled with 256-B payloads, nine in ten discarded at
   random: bytes held per byte of live payload without compaction and with it.

Needs lz4 (python-lz4, which the agent compresses with).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from array import array
from collections import Counter
from pathlib import Path

from netswap.protocol import PAGE_SIZE
from netswap.server.backends import MemoryBackend
from netswap.server.backends import classes as cl

THRESHOLD = 3072  # tests/corpus/RESULTS.md: stored whole above 75 % of a page
HEADER = 2  # the agent's length header in front of lz4's block
CHURN_OPS = 60_000
SAMPLE_EVERY = 2_000


def payloads_of(corpus: Path) -> list[bytes]:
    import lz4.block

    out: list[bytes] = []
    for path in sorted(corpus.glob("*.pages")):
        raw = path.read_bytes()
        for at in range(0, len(raw) - PAGE_SIZE + 1, PAGE_SIZE):
            page = raw[at : at + PAGE_SIZE]
            if page[:8] == page[8:16] and page[:8] * 512 == page:
                out.append(page[:8])
                continue
            packed = lz4.block.compress(page, store_size=False)
            size = -(-(HEADER + len(packed)) // cl.GRANULE) * cl.GRANULE
            if size > THRESHOLD:
                out.append(page)
            else:
                body = len(packed).to_bytes(HEADER, "little") + packed
                out.append(body + bytes(size - len(body)))
    return out


def static(lengths: Counter[int]) -> None:
    payload = sum(n * c for n, c in lengths.items())
    print("| zspage pages at most | bytes held per byte of payload |")
    print("|---|---|")
    for kmax in range(1, 9):
        held = 0.0
        for n, count in lengths.items():
            if n == PAGE_SIZE or n <= cl.INLINE_MAX:
                held += count * (PAGE_SIZE if n == PAGE_SIZE else cl.INLINE_COST)
                continue
            c = cl.class_of(n)
            best = min(
                ((k, cl.GRANULES_PER_PAGE * k // c) for k in range(1, kmax + 1)
                 if cl.GRANULES_PER_PAGE * k // c <= cl.MAX_SPOTS),
                key=lambda ks: (ks[0] * PAGE_SIZE / ks[1], ks[0]),
            )  # fmt: skip
            held += count * best[0] * PAGE_SIZE / best[1]
        print(f"| {kmax} | {held / payload:.4f} |")


def fill(payloads: list[bytes], slack: int | None) -> tuple[MemoryBackend, float]:
    """A store holding every payload at slot i (batches of 256); the seconds it took."""
    backend = MemoryBackend(len(payloads))
    backend.newer_only = True
    backend.objects.slack = slack
    area = backend.activate("a", len(payloads))
    began = time.process_time()
    for first in range(0, len(payloads), 256):
        batch = payloads[first : first + 256]
        lengths = array("H", map(len, batch))
        gens = array("Q", [1]) * len(batch)
        run = (range(first, first + len(batch)),)
        backend.write_runs(area, run, memoryview(b"".join(batch)), None, gens, None, lengths)
    return backend, time.process_time() - began


def held_ratio(backend: MemoryBackend) -> float:
    return backend.used_bytes / backend.payload_bytes


def churn(payloads: list[bytes], slack: int | None, seed: int = 1) -> tuple[float, float, float]:
    """Mean and worst bytes held per byte of payload under churn, and moves per write."""
    backend, _ = fill(payloads, slack)
    area = backend.area("a")
    rng, n, gen = random.Random(seed), len(payloads), 1
    samples, written = [], 0
    for op in range(CHURN_OPS):
        count = rng.randint(1, 32)
        first = rng.randrange(n - count)
        if rng.random() < 0.2:
            backend.discard(area, first, count)
        else:
            gen += 1
            batch = [payloads[rng.randrange(n)] for _ in range(count)]
            lengths = array("H", map(len, batch))
            gens = array("Q", [gen]) * count
            backend.write_runs(area, (range(first, first + count),),
                               memoryview(b"".join(batch)), None, gens, None, lengths)  # fmt: skip
            written += count
        if op % SAMPLE_EVERY == SAMPLE_EVERY - 1:
            samples.append(held_ratio(backend))
    moves = backend.counters["compaction_moves"] / written
    return statistics.mean(samples), max(samples), moves


def fragmentation(slack: int | None, pages: int = 4096) -> tuple[float, int, float]:
    """Bytes held per byte of live payload after 90 % of a store of 256-B payloads is
    discarded at random; and the moves it took."""
    payload = bytes(range(256))
    backend = MemoryBackend(pages)
    backend.objects.slack = slack
    n = pages * 16
    area = backend.activate("a", n)
    for first in range(0, n, 256):
        lengths = array("H", [256]) * 256
        backend.write_runs(area, (range(first, first + 256),), memoryview(payload * 256), None,
                           None, None, lengths)  # fmt: skip
    rng = random.Random(7)
    began = time.process_time()
    for slot in rng.sample(range(n), n * 9 // 10):
        backend.discard(area, slot, 1)
    return held_ratio(backend), backend.counters["compaction_moves"], time.process_time() - began


def main() -> None:
    parser = argparse.ArgumentParser(prog="size_classes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=Path(".cache/corpus"))
    args = parser.parse_args()
    payloads = payloads_of(args.corpus)
    lengths = Counter(map(len, payloads))
    total = len(payloads)
    print(f"# Size classes on the corpus ({total} pages, {args.corpus})\n")
    print("| payload length | pages | share |\n|---|---|---|")
    for n in sorted(lengths):
        print(f"| {n} | {lengths[n]} | {lengths[n] / total:.1%} |")
    print()
    static(lengths)
    backend, seconds = fill(payloads, 8)
    print(f"\nA memory store holding them (zspages of up to {cl.MAX_ZSPAGE_PAGES} pages): "
          f"{held_ratio(backend):.4f} bytes held per byte of payload, "
          f"{backend.used_bytes / (total * PAGE_SIZE):.4f} per byte of page swapped "
          f"(payloads alone: {backend.payload_bytes / (total * PAGE_SIZE):.4f}); metadata "
          f"{backend.metadata_bytes() / total:.1f} B per payload; written in "
          f"{seconds / total * 1e6:.1f} us of CPU per payload (batches of 256)")  # fmt: skip
    print(
        f"\nChurn: {CHURN_OPS} runs of 1-32 slots, 80 % rewritten with corpus payloads, "
        "20 % discarded\n"
    )
    print("| compaction slack | held / payload, mean | worst | moves per payload written |")
    print("|---|---|---|---|")
    slacks: tuple[int | None, ...] = (None, 2, 4, 8, 16, 64, 1 << 30)
    for slack in slacks:
        mean, worst, moves = churn(payloads, slack)
        print(f"| {name(slack)} | {mean:.4f} | {worst:.4f} | {moves:.3f} |")
    print("\nFragmentation: 65,536 payloads of 256 B, 90 % discarded at random, one by one\n")
    print("| compaction slack | held / live payload | moves | CPU s for the discards |")
    print("|---|---|---|---|")
    for slack in slacks:
        ratio, moves, seconds = fragmentation(slack)
        print(f"| {name(slack)} | {ratio:.3f} | {moves} | {seconds:.2f} |")


def name(slack: int | None) -> str:
    if slack is None:
        return "off"
    return "a zspage only" if slack == 1 << 30 else f"1/{slack}"


if __name__ == "__main__":
    main()
