"""Real text from this machine for the corpus sources to work on.

Debian's package database (/var/lib/dpkg/status), the licence texts in
/usr/share/common-licenses and the man pages' groff source: text every Debian
host has, in the shapes real programs hold (records of fields, long documents,
short names). Each reader is bounded by a byte budget its caller gives.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

DPKG_STATUS = Path("/var/lib/dpkg/status")
LICENSES = Path("/usr/share/common-licenses")
MAN = Path("/usr/share/man")


def dpkg_records() -> Iterator[dict[str, str]]:
    """Each package's stanza of the dpkg status file as {field: value} (continuations kept)."""
    record: dict[str, str] = {}
    field = ""
    for line in DPKG_STATUS.read_text(errors="replace").splitlines():
        if not line:
            if record:
                yield record
            record, field = {}, ""
        elif line[0] in " \t" and field:
            record[field] += "\n" + line
        elif ":" in line:
            field, _, value = line.partition(":")
            record[field] = value.strip()
    if record:
        yield record


def licenses() -> Iterator[tuple[str, str]]:
    """(name, text) of each licence in /usr/share/common-licenses."""
    for path in sorted(LICENSES.iterdir()):
        if path.is_file():
            yield path.name, path.read_text(errors="replace")


def man_pages(budget: int) -> Iterator[tuple[str, str]]:
    """(section/name, groff source) of man pages in sorted order, until `budget` bytes of text."""
    used = 0
    for section in sorted(MAN.glob("man[0-9]*")):
        for path in sorted(section.iterdir()):
            if used >= budget:
                return
            try:
                raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else None
            except (OSError, EOFError):
                continue  # a broken or non-gzip file: not text we can use
            if raw is None:
                continue
            used += len(raw)
            yield f"{section.name}/{path.name.removesuffix('.gz')}", raw.decode(errors="replace")
