"""python -m tests.bench.compress: the corpus figures that choose netswap's compression.

One run, one markdown report on stdout (issue 31): the same-filled share per
source; every codec and level's ratio, ratio under netswap's rules, and µs per
page to compress and decompress, overall and per source; the threshold and
granule sweeps; a zstd dictionary trained on a fifth of the corpus and measured
on the rest; the cost of spotting random (incompressible) pages; and the cost of
spotting same-filled pages. The corpus comes from `python -m tests.corpus`.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import zstandard

from tests.corpus import detect
from tests.corpus.generate import DEFAULT_DIR, load
from tests.corpus.measure import (
    GRANULE,
    PAGE,
    THRESHOLD,
    Codec,
    Result,
    codecs,
    cpu_per_call,
    run,
    same_filled,
    zstd_codec,
)

RANDOM_PAGES = 2048  # 8 MiB of os.urandom: enough for a stable µs figure
SWEEP_CODECS = ("lz4", "lz4 accel 4", "zstd -1", "zstd 1")
DICT_SIZES = (16 << 10, 64 << 10)
Corpus = list[tuple[str, list[bytes]]]


def x(ratio: float) -> str:
    """A bytes-out/bytes-in ratio as the factor zram reports (2.58x = 0.39)."""
    return f"{1 / ratio:.2f}x" if ratio else "inf"


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def combine(parts: Sequence[Result]) -> Result:
    """Results on each source as one over the whole corpus (times weighted by pages timed)."""
    same = sum(r.same for r in parts)
    lengths = [n for r in parts for n in r.lengths[: r.same]]
    lengths += [n for r in parts for n in r.lengths[r.same :]]
    comp = [r.pages - r.same for r in parts]
    dec = [r.pages - r.same - r.whole() for r in parts]

    def weighted(values: list[float], weights: list[int]) -> float:
        return sum(v * w for v, w in zip(values, weights, strict=True)) / max(1, sum(weights))

    return Result(
        sum(r.pages for r in parts),
        same,
        lengths,
        weighted([r.compress_us for r in parts], comp),
        weighted([r.decompress_us for r in parts], dec),
    )


def same_share(corpus: Corpus) -> str:
    rows = []
    for name, pages in [*corpus, ("all", [p for _, ps in corpus for p in ps])]:
        same = sum(map(same_filled, pages))
        zero = sum(p == bytes(PAGE) for p in pages)
        rows.append([name, len(pages), f"{same / len(pages):.1%}", f"{zero / len(pages):.1%}"])
    return table(["source", "pages", "same-filled", "of which zero (share of all)"], rows)


def codec_tables(corpus: Corpus, all_codecs: list[Codec]) -> tuple[str, dict[str, Result]]:
    overall: dict[str, Result] = {}
    per_source: list[list[object]] = []
    for codec in all_codecs:
        parts = [run(codec, pages) for _, pages in corpus]
        overall[codec.name] = total = combine(parts)
        per_source.append([codec.name, *(x(r.rule_ratio()) for r in parts), x(total.rule_ratio())])
        print(f"bench: {codec.name} done", file=sys.stderr, flush=True)
    head = ["codec", "raw ratio", "raw x", f"netswap ratio (T={THRESHOLD}, {GRANULE} B)"]
    head += ["netswap x", "stored whole", "compress µs/page", "decompress µs/page"]
    rows = [
        [name, f"{r.raw_ratio():.3f}", x(r.raw_ratio()), f"{r.rule_ratio():.3f}", x(r.rule_ratio()),
         f"{r.whole() / r.pages:.1%}", f"{r.compress_us:.1f}", f"{r.decompress_us:.1f}"]
        for name, r in overall.items()
    ]  # fmt: skip
    names = [name for name, _ in corpus]
    out = table(head, rows) + "\nPer source, netswap x (same rules):\n\n"
    return out + table(["codec", *names, "all"], per_source), overall


def sweeps(overall: dict[str, Result]) -> str:
    chosen = [n for n in SWEEP_CODECS if n in overall]
    percents = (50, 55, 60, 65, 70, 73, 75, 80, 85, 90)
    rows = []
    for pct in percents:
        t = PAGE * pct // 100
        rows.append([f"{pct} % ({t} B)", *(
            f"{overall[n].rule_ratio(t):.3f} / {overall[n].whole(t) / overall[n].pages:.1%}"
            for n in chosen)])  # fmt: skip
    out = "Threshold sweep (granule 256): bytes ratio / share of pages stored whole\n\n"
    out += table(["threshold", *chosen], rows)
    out += f"\nGranule sweep (threshold {THRESHOLD}): bytes ratio, and size classes\n\n"
    classes: list[list[object]] = [
        [f"{g} B", -(-THRESHOLD // g) + 1,
         *(f"{overall[n].rule_ratio(THRESHOLD, g):.3f}" for n in chosen)]
        for g in (1, 64, 128, 256, 512, 1024)
    ]  # fmt: skip
    return out + table(["granule", "classes", *chosen], classes)


def train(size: int, samples: list[bytes]) -> zstandard.ZstdCompressionDict | str:
    data: list[bytes | bytearray | memoryview] = [*samples]
    try:
        return zstandard.train_dictionary(size, data)
    except zstandard.ZstdError as e:  # too few samples for this size (a small corpus)
        return f"not trained ({e})"


def dictionaries(corpus: Corpus) -> str:
    """zstd with a dictionary trained on a random fifth of each source, measured on the rest;
    then, per source, one trained on the other sources only (a dictionary shipped with
    netswap meets programs it was not trained on)."""
    rng = random.Random(0)
    fifths: dict[str, list[bytes]] = {}
    rest: Corpus = []
    for name, pages in corpus:
        picks = set(rng.sample(range(len(pages)), len(pages) // 5))
        fifths[name] = [p for i, p in enumerate(pages) if i in picks and not same_filled(p)]
        rest.append((name, [p for i, p in enumerate(pages) if i not in picks]))
    everything = [p for ps in fifths.values() for p in ps]
    rows = []
    for level in (-1, 1, 3):
        plain = combine([run(zstd_codec(f"zstd {level}", level), ps) for _, ps in rest])
        rows.append([f"zstd {level}", "none", f"{plain.rule_ratio():.3f}", x(plain.rule_ratio()),
                     f"{plain.compress_us:.1f}", f"{plain.decompress_us:.1f}"])  # fmt: skip
        for size in DICT_SIZES:
            began = time.monotonic()
            trained = train(size, everything)
            if isinstance(trained, str):
                rows.append([f"zstd {level}", f"{size >> 10} KiB: {trained}", "", "", "", ""])
                continue
            seconds = time.monotonic() - began
            r = combine(
                [run(zstd_codec(f"zstd {level} dict", level, trained), ps) for _, ps in rest]
            )
            rows.append([f"zstd {level}", f"{size >> 10} KiB (trained in {seconds:.1f} s)",
                         f"{r.rule_ratio():.3f}", x(r.rule_ratio()), f"{r.compress_us:.1f}",
                         f"{r.decompress_us:.1f}"])  # fmt: skip
    head = ["codec", "dictionary", "netswap ratio", "netswap x", "compress µs", "decompress µs"]
    out = f"Trained on {len(everything)} pages (a fifth of each source), measured on the other "
    out += f"{sum(len(ps) for _, ps in rest)}.\n\n" + table(head, rows)
    size, level = DICT_SIZES[-1], 1
    rows = []
    for name, pages in rest:
        others = train(size, [p for n, ps in fifths.items() if n != name for p in ps])
        alone = run(zstd_codec("zstd", level), pages, timed=False).rule_ratio()
        if isinstance(others, str):
            cell = others
        else:
            with_others = run(zstd_codec("zstd dict", level, others), pages, timed=False)
            cell = f"{with_others.rule_ratio():.3f}"
        rows.append([name, f"{alone:.3f}", cell])
    out += f"\nzstd {level}, {size >> 10} KiB dictionary trained on the other sources only:\n\n"
    return out + table(["measured on", "no dictionary", "dictionary from the others"], rows)


def incompressible(corpus: Corpus, all_codecs: list[Codec], count: int) -> str:
    noise = [os.urandom(PAGE) for _ in range(count)]
    rows = []
    for codec in all_codecs:
        if codec.name in ("lz4", "lz4 accel 16", "lz4 accel 64", "zstd -5", "zstd -1", "zstd 1"):
            size = sum(len(codec.compress(p)) for p in noise) / len(noise)
            cost = cpu_per_call(codec.compress, noise)
            rows.append([f"full compress, {codec.name}", f"{cost:.1f}", f"{size:.0f} B", "", ""])
    pages = [p for _, ps in corpus for p in ps if not same_filled(p)]
    lz4 = next(c for c in all_codecs if c.name == "lz4")
    fits = [len(lz4.compress(p)) <= THRESHOLD for p in pages]
    for name, probe in detect.probes().items():
        caught = sum(map(probe, noise)) / len(noise)
        flagged = [probe(p) for p in pages]
        wrong = sum(f and ok for f, ok in zip(flagged, fits, strict=True))
        rows.append([f"probe: {name}", f"{cpu_per_call(probe, noise):.1f}", f"{caught:.1%} caught",
                     f"{sum(flagged) / len(pages):.1%}", f"{wrong / len(pages):.2%}"])  # fmt: skip
    head = ["on random pages", "µs/page", "output / verdict", "corpus flagged",
            "corpus flagged but lz4 fits"]  # fmt: skip
    return table(head, rows)


def detectors(corpus: Corpus, count: int) -> str:
    pages = [p for _, ps in corpus for p in ps]
    views = [memoryview(p) for p in pages]
    truth = [same_filled(p) for p in pages]
    zeros, worst = [bytes(PAGE)] * count, [detect.worst_case()] * count
    inputs: list[Sequence[detect.Page]] = [pages, views, zeros, worst]
    rows = []
    found: dict[str, detect.Detector] = {
        **detect.same_filled_detectors(),
        "zero only: p == ZERO": detect.zero_only,
    }
    for name, check in found.items():
        if check is not detect.zero_only and (
            [check(p) for p in pages] != truth or [check(v) for v in views] != truth
        ):
            raise AssertionError(f"same-filled detector {name!r} disagrees with the reference")
        times = [cpu_per_call(check, s) for s in inputs]
        rows.append([name, *(f"{t:.2f}" for t in times)])
    head = ["method", "corpus (bytes)", "corpus (memoryview)", "zero page", "worst case"]
    return table(head, rows)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.compress", description=__doc__)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--pages", type=int, default=0, help="pages per source (0: all)")
    parser.add_argument("--random-pages", type=int, default=RANDOM_PAGES,
                        help="random pages (and zero pages) for the detection tables")  # fmt: skip
    args = parser.parse_args()
    corpus = [(n, ps[: args.pages] if args.pages else ps) for n, ps in load(args.corpus)]
    if not corpus:
        print(f"bench: no corpus in {args.corpus}: run `python -m tests.corpus` (root) first",
              file=sys.stderr)  # fmt: skip
        return 1
    all_codecs = codecs()
    print(f"# Compression on the corpus ({time.strftime('%Y-%m-%d')}, {platform.node()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}, load average at start "
          f"{os.getloadavg()[0]:.1f})\n")  # fmt: skip
    print("## Same-filled pages\n\n" + same_share(corpus))
    codec_text, overall = codec_tables(corpus, all_codecs)
    print("## Codecs\n\n" + codec_text)
    print("## Threshold and granule\n\n" + sweeps(overall))
    print("## zstd with a trained dictionary\n\n" + dictionaries(corpus))
    print("## Incompressible pages\n\n" + incompressible(corpus, all_codecs, args.random_pages))
    print("## Same-filled detection, µs per page\n\n" + detectors(corpus, args.random_pages))
    print(f"Load average at the end: {os.getloadavg()[0]:.1f} (µs are CPU time, best of 3).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
