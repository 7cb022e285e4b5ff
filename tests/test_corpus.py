"""The corpus generator reads a real process's anonymous memory, and the bench runs on it.

A short-lived child (Debian's python3) writes a marker it computes from a token
given on its command line, maps 64 MiB it never touches and reads one page it
never writes. The generator must find the computed marker, take every anonymous
page the kernel counts (RssAnon) and none of the untouched or zero-mapped ones.
Then the bench runs end to end on a few of those pages.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .bench import compress
from .corpus import detect, measure
from .corpus.generate import generate, load
from .corpus.procmem import reservoir
from .corpus.sources import Source, child

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="reads /proc/kpageflags: needs root")

CHILD = r"""
import mmap, sys
marker = (sys.argv[1][::-1] + '-in-the-heap-') * 64
held = [marker.encode()]
untouched = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE)
only_read = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE)
only_read[4096]  # maps the zero page: present, never written
print('ready', flush=True)
sys.stdin.read()
"""


def marker_source(token: str) -> Source:
    @contextlib.contextmanager
    def start(work: Path) -> Iterator[int]:
        with child(["/usr/bin/python3", "-c", CHILD, token]) as pid:
            yield pid

    return Source("marker", "a python3 child holding a marker", start)


def test_the_corpus_holds_the_childs_anonymous_pages_and_only_those(tmp_path: Path) -> None:
    token = secrets.token_hex(8)
    manifest = generate(tmp_path, [marker_source(token)], cap=(32 << 20) // 4096)
    entry = manifest["marker"]
    data = (tmp_path / "marker.pages").read_bytes()
    assert (token[::-1] + "-in-the-heap-").encode() * 4 in data
    assert secrets.token_hex(8)[::-1].encode() not in data  # a token no child was given
    assert entry["pages"] == len(data) // 4096 == entry["eligible_pages"]  # under the cap: all
    # Exactly the pages the kernel counts as the child's anonymous memory: the untouched
    # 64 MiB (16384 pages) and the zero-mapped page are not among them.
    assert isinstance(entry["eligible_pages"], int) and isinstance(entry["swapped_pages"], int)
    assert (entry["eligible_pages"] - entry["swapped_pages"]) * 4 == entry["rss_anon_kib"]
    assert entry["eligible_pages"] < 16384
    assert isinstance(entry["zero_mapped_skipped"], int) and entry["zero_mapped_skipped"] >= 1
    assert entry["unreadable"] == 0
    (name, pages), *rest = load(tmp_path)
    assert name == "marker" and not rest and b"".join(pages) == data


def test_reservoir_keeps_cap_addresses_drawn_from_all() -> None:
    kept, seen = reservoir(iter(range(100_000)), 1000, random.Random(1))
    assert seen == 100_000 and len(kept) == 1000 and kept == sorted(set(kept))
    assert 40_000 < sum(kept) / len(kept) < 60_000  # uniform, not the first 1000
    assert reservoir(iter(range(10)), 1000, random.Random(1)) == (list(range(10)), 10)


def test_netswap_rules_on_zero_random_and_real_pages(tmp_path: Path) -> None:
    generate(tmp_path, [marker_source(secrets.token_hex(8))], cap=64)
    ((_, real),) = load(tmp_path)
    noise = os.urandom(4096)
    pages = [*real[:16], bytes(4096), b"\x07" * 4096, noise]
    stored = [measure.stored_bytes(n) for n in (1, 256, 257, 2990, 2991)]
    assert stored == [256, 256, 512, 3072, 4096]
    for codec in measure.codecs():
        result = measure.run(codec, pages, timed=False)  # round-trips every page
        assert result.same == 2 and result.lengths[0] < 64  # zero and 0x07 pages, first
        assert result.whole() >= 1  # the random page is stored whole
        assert result.stored() < (len(pages) - 2) * 4096
    checks = [*detect.same_filled_detectors().values()]
    for page in pages:
        assert all(check(page) == measure.same_filled(page) for check in checks)
        assert all(check(memoryview(page)) == measure.same_filled(page) for check in checks)
    assert all(probe(noise) for probe in detect.probes().values())


def test_the_bench_runs_end_to_end_on_a_few_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    generate(tmp_path, [marker_source(secrets.token_hex(8))], cap=256)
    argv = ["compress", "--corpus", str(tmp_path), "--pages", "48", "--random-pages", "32"]
    monkeypatch.setattr(sys, "argv", argv)
    assert compress.main() == 0
    out = capsys.readouterr().out
    for section in ("Same-filled pages", "Codecs", "Threshold", "dictionary", "Incompressible"):
        assert f"## {section}" in out or section in out
    assert "| lz4 | " in out and "| zstd 1 | " in out
