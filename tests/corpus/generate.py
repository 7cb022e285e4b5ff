"""Build the corpus: start each source, read its anonymous pages, write them down.

One file per source, `<name>.pages`, raw 4096-byte pages in address order, and
`manifest.json` beside them saying for each source what it ran, its pid, how
many pages it had and how many were kept. The corpus lives in the cache
(.cache/corpus/, ignored by git): it is rebuilt on any Debian host with
`python -m tests.corpus`, and it holds other programs' memory, which has no
place in the repository.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from . import procmem
from .sources import REPO, SOURCES, Source

DEFAULT_DIR = REPO / ".cache" / "corpus"
PAGE = procmem.PAGE
# Pages kept per source: 64 MiB. Sampled uniformly, so a larger process is still
# represented in proportion; it bounds the corpus on disk and in the bench's memory
# (5 sources = 320 MiB) and keeps the bench's ~20 codecs x every page to minutes on
# 2 vCPUs.
CAP_PAGES = (64 << 20) // PAGE


def read_manifest(out: Path) -> dict[str, dict[str, object]]:
    path = out / "manifest.json"
    if not path.exists():
        return {}
    data: dict[str, dict[str, object]] = json.loads(path.read_text())["sources"]
    return data


def write_manifest(out: Path, sources: dict[str, dict[str, object]]) -> None:
    doc = {"machine": f"{platform.node()} {platform.release()}", "sources": sources}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    tmp.replace(out / "manifest.json")


def collect(source: Source, out: Path, cap: int = CAP_PAGES, seed: int = 0) -> dict[str, object]:
    """Run one source, sample it, write <name>.pages; its manifest entry."""
    began = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix=f"corpus-{source.name}-") as work,
        source.start(Path(work)) as pid,
    ):
        ready = time.monotonic() - began
        sample = procmem.sample(pid, cap, seed)
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    (out / f"{source.name}.pages").write_bytes(sample.pages)
    return {
        "about": source.about,
        "comm": comm,
        "pid": sample.pid,
        "pages": len(sample.pages) // PAGE,
        "bytes": len(sample.pages),
        "eligible_pages": sample.eligible,
        "swapped_pages": sample.swapped,
        "rss_anon_kib": sample.rss_anon_kib,
        "zero_mapped_skipped": sample.zero_mapped,
        "unreadable": sample.unreadable,
        "cap_pages": cap,
        "seconds_to_ready": round(ready, 1),
        "sampled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def generate(
    out: Path, sources: Iterable[Source] = SOURCES, cap: int = CAP_PAGES
) -> dict[str, dict[str, object]]:
    """Collect every source into out (sources collected before stay in the manifest)."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out)
    for source in sources:
        entry = collect(source, out, cap)
        manifest[source.name] = entry
        write_manifest(out, manifest)
        print(
            f"corpus: {source.name}: {entry['pages']} of {entry['eligible_pages']} anonymous"
            f" pages ({entry['comm']} pid {entry['pid']}, ready in {entry['seconds_to_ready']} s)",
            flush=True,
        )
    return manifest


def load(out: Path = DEFAULT_DIR) -> Iterator[tuple[str, list[bytes]]]:
    """(source, pages) for each source in the manifest, in its order."""
    for name, entry in read_manifest(out).items():
        data = (out / f"{name}.pages").read_bytes()
        if len(data) != entry["bytes"]:
            raise ValueError(
                f"{name}.pages holds {len(data)} bytes, the manifest says {entry['bytes']}"
            )
        yield name, [data[i : i + PAGE] for i in range(0, len(data), PAGE)]
