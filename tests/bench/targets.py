"""What one run of `make bench-agent` says of issue 31's targets and issue 29's "must not fall".

Every figure is this run's: a ratio is taken between two servers that ran the
same row back to back in the same round (the order flips every round, so that
neither side always runs first or last), and printed as the median over the
rounds with its range, the range being the noise this shared machine put on it.
A target is "met" when the median meets it, "within noise" when the median
misses it but some round's ratio meets it, else "MISSED". Beside each throughput
ratio stand the agents' CPU per page (their process trees' user + system time
over the run), and below, what lz4 costs a page in this process: the budget
line that holds a missed target.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lz4.block
from netswap.client.agent.payload import decode, encode

from .content import LINK_BPS, ROWS
from .fio import Result, Workload

Results = dict[str, dict[str, list[Result]]]  # server -> row -> one Result per round
Figures = dict[str, dict[str, float]]  # content server -> bytes per page and the like
BUDGET_PAGES = 4096  # pages compressed for the budget line: ~20 ms of lz4, 3 passes


def pages_of(row: str) -> int:
    """Pages per request of a row named like '64K randwrite QD32'."""
    size = next(w for w in row.split() if w.endswith("K"))
    return int(size[:-1]) // 4


def per_round(results: Results, a: str, b: str, row: str, field: str = "iops") -> list[float]:
    """a's figure over b's, one ratio per round."""
    return [getattr(x, field) / getattr(y, field)
            for x, y in zip(results[a][row], results[b][row], strict=True)]  # fmt: skip


def cpu_ratio(results: Results, a: str, b: str, row: str) -> list[float]:
    """b's CPU per request over a's, per round, all of it: agent, store and client
    (fio's or replay's). On 2 vCPUs kept busy, a CPU-bound row's throughput ratio
    tends to this; and CPU time is little moved by other processes' load, where
    throughput is moved a lot."""

    def total(r: Result) -> float:
        return r.server_cpu_us + r.store_cpu_us + r.cpu_us

    return [total(y) / total(x)
            for x, y in zip(results[a][row], results[b][row], strict=True)]  # fmt: skip


def verdict(ratios: Sequence[float], bound: float, at_least: bool) -> str:
    def ok(x: float) -> bool:
        return x >= bound if at_least else x <= bound

    if ok(statistics.median(ratios)):
        return "met"
    return "within noise" if any(ok(x) for x in ratios) else "MISSED"


def shown(ratios: Sequence[float]) -> str:
    return f"{statistics.median(ratios):5.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]"


def cpu_per_page(results: Results, name: str, row: str, field: str = "server_cpu_us") -> float:
    return float(statistics.median(getattr(r, field) for r in results[name][row])) / pages_of(row)


def line(results: Results, a: str, b: str, row: str, bound: float, label: str = "") -> None:
    r = per_round(results, a, b, row)
    cpu = ""
    for f in ("server_cpu_us", "store_cpu_us"):
        x, y = cpu_per_page(results, a, row, f), cpu_per_page(results, b, row, f)
        cpu += f"{x:6.1f} /{y:6.1f}  "
    c = statistics.median(cpu_ratio(results, a, b, row))
    target = f">= {bound:.2f} {verdict(r, bound, True)}" if bound else "(no target)"
    if bound and c < bound:  # the steadier figure says the same row misses
        target += " (CPU b/a misses it)"
    print(f"  {label or row:<28}{shown(r):<22}{cpu}{c:5.2f}x  {target}")


def save(path: Path, results: Results, workloads: Sequence[Workload], figures: Figures) -> None:
    """The run's figures as JSON: `--report PATH` prints them again."""
    doc = {"results": {name: {row: [dataclasses.asdict(r) for r in runs]
                              for row, runs in rows.items()} for name, rows in results.items()},
           "workloads": [dataclasses.asdict(w) for w in workloads], "figures": figures}  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def load(path: Path) -> tuple[Results, list[Workload], Figures]:
    doc = json.loads(path.read_text())
    results = {name: {row: [Result(**r) for r in runs] for row, runs in rows.items()}
               for name, rows in doc["results"].items()}  # fmt: skip
    return results, [Workload(**w) for w in doc["workloads"]], doc["figures"]


def report(results: Results, workloads: Sequence[Workload], figures: Figures) -> None:
    """figures: the content rows' bytes (Content.figures), or empty without them."""
    rounds = len(next(iter(next(iter(results.values())).values())))
    print(f"\ntargets: throughput a / b within each round, median [min-max] over {rounds} rounds; "
          "CPU us per page (user + system) of the two agents' process trees and of their "
          "stores; CPU b/a: all CPU per request, the client's included, b's over a's (what the "
          "throughput ratio tends to where CPU is the limit)")  # fmt: skip
    print(
        f"  {'row':<28}{'ratio [range]':<22}{'agent a / b':<16}{'store a / b':<16}CPU b/a  target"
    )
    names = [w.name for w in workloads]
    if "agent-raw" in results:
        print("#31 random content (fio's buffers): agent (lz4) / agent-raw (--compress off)")
        for row in names:
            line(results, "agent", "agent-raw", row, 0.9)
    if figures:
        corpus(results, figures)
    if "agent-before" in results:
        print("#29 the agent / 6afe607's agent (agent-before), random content, must not fall")
        for row in names:
            line(results, "agent", "agent-before", row, 0.95)
        if "agent-raw" in results:
            print("    the same with --compress off (the machine alone, like for like)")
            for row in names:
                line(results, "agent-raw", "agent-before", row, 0.95)
        for row in (n for n in names if n.endswith("QD1")):
            r = per_round(results, "agent", "agent-before", row, "p50_us")
            print(f"  p50 {row:<24}{shown(r)}  (latency: lower is better)")
    budget(bool(figures))


def corpus(results: Results, figures: Figures) -> None:
    lz4, raw = figures["agent-corpus"], figures["agent-corpus-raw"]
    print("#31 corpus content (tests/corpus, .cache/corpus): agent (lz4) / --compress off; "
          "writes by replay.py, reads by fio")  # fmt: skip
    print(f"  {'row':<28}{'server':<18}{'IOPS':>9}{'pages/s':>10}{'p50 us':>9}{'p99 us':>9}")
    for row in ROWS:
        for name in ("agent-corpus", "agent-corpus-raw"):
            runs = results[name][row.name]
            iops = statistics.median(r.iops for r in runs)
            print(f"  {row.name:<28}{name:<18}{iops:>9,.0f}{iops * pages_of(row.name):>10,.0f}"
                  f"{statistics.median(r.p50_us for r in runs):>9.1f}"
                  f"{statistics.median(r.p99_us for r in runs):>9.1f}")  # fmt: skip
    for row in ROWS[:-1]:
        bound = 0.85 if "write" in row.name or "randread QD32" in row.name else 0.0
        line(results, "agent-corpus", "agent-corpus-raw", row.name, bound)
    zeros = results["agent-corpus"][ROWS[-1].name]
    zero = statistics.median(z.p50_us for z in zeros)
    for other, name, label in (("agent-corpus", "corpus 4K randread QD1", "a stored corpus page"),
                              ("agent-corpus-raw", "corpus 4K randread QD1", "a whole page"),
                              ("agent", "4K randread QD1", "a stored random page")):  # fmt: skip
        if name not in results.get(other, {}):
            continue
        r = [z.p50_us / o.p50_us for z, o in zip(zeros, results[other][name], strict=True)]
        print(
            f"  p50 swap-in QD1, zero page / {label:<22}{shown(r):<22}"
            f"{zero:6.1f} us  <= 0.30 {verdict(r, 0.3, False)}"
        )
    used, end = lz4["used"] / raw["used"], lz4["used_end"] / raw["used_end"]
    print(f"  store bytes per swapped page after the fill: {lz4['used']:,.0f} / {raw['used']:,.0f}"
          f" = {used:.3f}x  <= 0.45 {'met' if used <= 0.45 else 'MISSED'}"
          f"  (payloads {lz4['payload']:,.0f} B/page; the store holds {lz4['held']:.3f}"
          " payloads per page written)")  # fmt: skip
    print(f"  the same after the rounds' rewrites, zero tail included: {lz4['used_end']:,.0f} / "
          f"{raw['used_end']:,.0f} = {end:.3f}x")  # fmt: skip
    for way, what in (("wire_out", "swap-out (the fill)"), ("wire_in", "swap-in (a read-back)")):
        a, b = lz4[way], raw[way]
        print(f"  wire bytes per page, {what}: {a:,.0f} / {b:,.0f} = {a / b:.3f}x; a 10 GbE "
              f"link carries {LINK_BPS / a:,.0f} / {LINK_BPS / b:,.0f} pages/s "
              f"({LINK_BPS / a * 4096 / 2**30:.2f} / {LINK_BPS / b * 4096 / 2**30:.2f} GiB/s "
              "of swap)")  # fmt: skip


def budget(with_corpus: bool) -> None:
    """lz4 per page in this process, as the agent calls it (CPU time, best of 3)."""
    pools: dict[str, list[bytes]] = {
        "random": [os.urandom(4096) for _ in range(BUDGET_PAGES)],
    }
    if with_corpus:
        from .replay import corpus_pages

        every = corpus_pages()
        pick = random.Random(1).sample(range(len(every)), BUDGET_PAGES)
        pools["corpus"] = [bytes(every[i]) for i in pick]

    def best(call: Callable[[bytes], object], pages: list[bytes]) -> float:
        times = []
        for _ in range(3):
            t = time.process_time()
            for p in pages:
                call(p)
            times.append(time.process_time() - t)
        return min(times) / len(pages) * 1e6

    parts, out = [], memoryview(bytearray(4096))
    for name, pages in pools.items():
        packed = [lz4.block.compress(p, store_size=False) for p in pages]
        c = best(lambda p: lz4.block.compress(p, store_size=False), pages)
        d = best(lambda q: lz4.block.decompress(q, uncompressed_size=4096), packed)
        e = best(lambda p: encode(memoryview(p), out), pages)
        payloads = []
        for p in pages:
            payloads.append(bytes(out[: encode(memoryview(p), out)]))
        back = best(lambda q: decode(memoryview(q), out), payloads)
        raw = best(lambda p: encode(memoryview(p), out, compress=False), pages)
        parts.append(f"{name} page: lz4 {c:.1f} / {d:.1f} us, the agent's encode {e:.1f} "
                     f"(compress=off {raw:.1f}) / decode {back:.1f} us")  # fmt: skip
    print("budget per page, in this process (CPU, best of 3 passes over "
          f"{BUDGET_PAGES:,} pages; compress / decompress): " + "; ".join(parts))  # fmt: skip
