"""The rows of `make bench-agent` with real content (#31): corpus pages and zero pages.

Two agents, each over a store of its own (so its Stats are its pages'): one at
the default (lz4) and one with `--compress off`. Both exports are filled with
corpus pages (replay.prefill: slot i holds the i-th page of a seeded shuffle of
the whole corpus), then their last ZERO_MIB with zero pages. Each round runs
every row on both, back to back: writes of corpus pages by replay.py (fio cannot
write real memory), reads by fio (what fio reads is what the export holds),
same-filled reads by fio over the zero span. The random-content rows are bench
-agent's own fio rows (fio's buffers are random bytes), against `agent-raw`.

Bytes: the stores' Stats after the fill (used_bytes: arena pages in use, size
classes and all; payload_bytes: what was sent) and again at the end, after the
rounds rewrote pages; and what crossed the wire, from the kernel's own counts
of the stores' sockets (ss: tcp_info bytes_received / bytes_acked): the fill's
swap-outs and one sequential read-back of the corpus span.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

from ..conftest import free_port
from ..procs import StoreProc
from . import replay
from .bench_nbd import netswap_cmd, server
from .fio import Result, Workload, fio

PAGE = 4096
SIZE_MIB = 256  # bench_agent's SIZE
ZERO_MIB = 16  # the export's tail holds zero pages: 4,096 slots to read same-filled
CORPUS_MIB = SIZE_MIB - ZERO_MIB
CORPUS_PAGES = CORPUS_MIB << 20 >> 12
SERVERS = {"agent-corpus": (), "agent-corpus-raw": ("--compress", "off")}
# 10 GbE carries 1,448 B of TCP payload per 1,538 B on the wire (MTU 1500, TCP
# timestamps; Ethernet header, FCS, preamble and gap): 1.177 GB/s.
LINK_BPS = 10e9 / 8 * 1448 / 1538


@dataclass(frozen=True)
class Row:
    name: str
    work: Workload
    replay: bool  # written by replay.py (corpus pages), else fio over `offset`/`size`
    offset: int = 0  # MiB
    size: int = CORPUS_MIB


ROWS = (
    Row("corpus 4K randwrite QD32", Workload("", "randwrite", "4k", 32), True),
    Row("corpus 4K randread QD32", Workload("", "randread", "4k", 32), False),
    Row("corpus 64K randwrite QD32", Workload("", "randwrite", "64k", 32), True),
    Row("corpus 128K randwrite QD8", Workload("", "randwrite", "128k", 8), True),
    Row("corpus 4K randread QD1", Workload("", "randread", "4k", 1), False),
    Row("zero 4K randread QD1", Workload("", "randread", "4k", 1), False, CORPUS_MIB, ZERO_MIB),
)


def sockets(port: int) -> tuple[int, int]:
    """(bytes received, bytes sent and acknowledged) over the TCP connections a
    listener on this port holds, as the kernel counts them (tcp_info)."""
    out = subprocess.run(["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    got = sum(int(n) for n in re.findall(r"bytes_received:(\d+)", out))
    sent = sum(int(n) for n in re.findall(r"bytes_acked:(\d+)", out))
    return got, sent


def readback(uri: str) -> None:
    """The corpus span read once, in order, 1 MiB at a time."""
    cmd = ["fio", "--name=readback", "--ioengine=nbd", f"--uri={uri}", "--rw=read",
           "--bs=1m", "--iodepth=4", f"--size={CORPUS_MIB}M", "--output-format=json"]  # fmt: skip
    subprocess.run(cmd, capture_output=True, check=True, timeout=300)


class Content:
    def __init__(self, stack: ExitStack, pin: list[str], rounds_s: float, procs: int) -> None:
        self.runtime, self.procs = rounds_s, procs
        self.stores: dict[str, tuple[StoreProc, int]] = {}
        self.uris: dict[str, str] = {}
        self.figures: dict[str, dict[str, float]] = {name: {} for name in SERVERS}
        for name, extra in SERVERS.items():
            http = free_port()
            store = StoreProc("1G", ("--http", f"127.0.0.1:{http}")).start()
            stack.callback(store.kill)
            self.stores[name] = (store, http)
            port = free_port()
            cmd = netswap_cmd(port, ["--backend", "remote", "--store", store.address,
                                     "--area", f"c{len(self.uris)}", *pin, *extra])  # fmt: skip
            self.uris[name] = stack.enter_context(server(cmd, port))

    def stats(self, name: str) -> dict[str, int]:
        _, http = self.stores[name]
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/api/stats", timeout=10) as r:
            row: dict[str, int] = json.loads(r.read())["stores"][0]
        return row

    def prefill(self) -> None:
        """Corpus pages, the stores' bytes and the wire's; zero pages at the tail; a
        sequential read-back of the corpus span for the wire's bytes per swap-in."""
        for name, uri in self.uris.items():
            fig, port = self.figures[name], self.stores[name][0].port
            got0, _ = sockets(port)
            pages = replay.prefill(uri, "corpus")
            got1, _ = sockets(port)
            st = self.stats(name)
            fig.update(wire_out=(got1 - got0) / pages, used=st["used_bytes"] / st["pages"],
                       payload=st["payload_bytes"] / st["pages"])  # fmt: skip
            replay.prefill(uri, "zero", CORPUS_PAGES)
            _, sent2 = sockets(port)
            readback(uri)
            _, sent3 = sockets(port)
            fig["wire_in"] = (sent3 - sent2) / CORPUS_PAGES

    def round(self, results: dict[str, dict[str, list[Result]]]) -> None:
        for row in ROWS:
            for name, uri in self.uris.items():
                if row.replay:
                    pages = int(row.work.bs.rstrip("k")) // 4
                    job = replay.Job(uri, pages, row.work.iodepth, self.runtime,
                                     count=CORPUS_PAGES, procs=self.procs)  # fmt: skip
                    o = replay.run(job)
                    res = Result(o.iops, o.p50_us, o.p99_us, o.cpu_us)
                else:
                    res = fio(uri, row.work, f"{row.size}M", self.runtime, f"{row.offset}M")
                results.setdefault(name, {}).setdefault(row.name, []).append(res)

    def finish(self) -> None:
        for name in self.uris:
            st = self.stats(name)
            self.figures[name]["used_end"] = st["used_bytes"] / st["pages"]


def report(content: Content, med: Callable[[str, str], tuple[float, float, float]]) -> None:
    """Each target of #31 with its figure from this run: met or missed."""
    lz4, raw = (content.figures[n] for n in SERVERS)
    print("\ncontent rows (#31): the agent at its default (lz4) against --compress off, "
          "same run; corpus writes by tests/bench/replay.py, reads by fio")  # fmt: skip

    def line(what: str, value: float, target: str, ok: bool) -> None:
        print(f"  {what:<58}{value:>8.2f}x  target {target:<7}{'met' if ok else 'MISSED'}")

    print(f"  {'row':<28}{'server':<18}{'IOPS':>9}{'pages/s':>10}{'p50 us':>9}{'p99 us':>9}")
    for row in ROWS:
        pages = int(row.work.bs.rstrip("k")) // 4
        for name in SERVERS:
            iops, p50, p99 = med(name, row.name)
            print(f"  {row.name:<28}{name:<18}{iops:>9,.0f}{iops * pages:>10,.0f}"
                  f"{p50:>9.1f}{p99:>9.1f}")  # fmt: skip
    for row in ROWS[:4]:
        pages = int(row.work.bs.rstrip("k")) // 4
        a, b = med("agent-corpus", row.name)[0], med("agent-corpus-raw", row.name)[0]
        line(f"{row.name}, lz4 / off", a / b, ">= 0.85", a / b >= 0.85)
    zero = med("agent-corpus", "zero 4K randread QD1")[1]
    for stored, p50 in (("a corpus page", med("agent-corpus", "corpus 4K randread QD1")[1]),
                        ("a random page", med("agent", "4K randread QD1")[1])):  # fmt: skip
        print(f"  p50 swap-in QD1: zero page {zero:.1f} us, {stored} {p50:.1f} us")
        line(f"p50 swap-in of a zero page / {stored}", zero / p50, "<= 0.3", zero / p50 <= 0.3)
    used = lz4["used"] / raw["used"]
    print(f"  store bytes per page after the fill: {lz4['used']:,.0f} (payloads "
          f"{lz4['payload']:,.0f}) / {raw['used']:,.0f}; after the rounds "
          f"{lz4['used_end']:,.0f} / {raw['used_end']:,.0f}")  # fmt: skip
    line("store bytes per page (used_bytes), lz4 / off", used, "<= 0.45", used <= 0.45)
    end = lz4["used_end"] / raw["used_end"]
    line("the same after the rounds' rewrites", end, "<= 0.45", end <= 0.45)
    for way in ("wire_out", "wire_in"):
        a, b = lz4[way], raw[way]
        print(f"  wire bytes per page {way[5:]}: {a:,.0f} / {b:,.0f} ({a / b:.2f}x); "
              f"10 GbE carries {LINK_BPS / a:,.0f} / {LINK_BPS / b:,.0f} pages/s")  # fmt: skip
