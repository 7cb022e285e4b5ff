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
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial

from ..conftest import free_port
from ..procs import StoreProc
from . import replay
from .bench_nbd import BEHIND, measured, netswap_cmd, server
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
            BEHIND[self.uris[name]] = store.pid

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
            # per page swapped: a same-filled page is a payload of its own (the
            # store's pages count it), but divide by what was written all the same
            fig.update(wire_out=(got1 - got0) / pages, used=st["used_bytes"] / pages,
                       payload=st["payload_bytes"] / pages, held=st["pages"] / pages)  # fmt: skip
            replay.prefill(uri, "zero", CORPUS_PAGES)
            _, sent2 = sockets(port)
            readback(uri)
            _, sent3 = sockets(port)
            fig["wire_in"] = (sent3 - sent2) / CORPUS_PAGES

    def round(self, results: dict[str, dict[str, list[Result]]], reverse: bool) -> None:
        """Every row on both agents back to back (`reverse`: off first)."""
        order = list(self.uris.items())[:: -1 if reverse else 1]
        for row in ROWS:
            for name, uri in order:
                res = measured(uri, partial(self.one, row, uri), self.runtime)
                results.setdefault(name, {}).setdefault(row.name, []).append(res)

    def one(self, row: Row, uri: str) -> Result:
        if not row.replay:
            return fio(uri, row.work, f"{row.size}M", self.runtime, f"{row.offset}M")
        pages = int(row.work.bs.rstrip("k")) // 4
        job = replay.Job(uri, pages, row.work.iodepth, self.runtime,
                         count=CORPUS_PAGES, procs=self.procs)  # fmt: skip
        o = replay.run(job)
        return Result(o.iops, o.p50_us, o.p99_us, o.cpu_us)

    def finish(self) -> None:
        """The stores' bytes after the rounds' rewrites, per slot written (the
        corpus span and the zero tail)."""
        for name in self.uris:
            st = self.stats(name)
            self.figures[name]["used_end"] = st["used_bytes"] / (SIZE_MIB << 20 >> 12)
