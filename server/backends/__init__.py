"""Page-store backends: `memory` (mmap arena) and `file` (page file + index)."""

from __future__ import annotations

from .file import FileBackend
from .memory import MemoryBackend
from .payloads import PageBackend
from .slotmap import UNMAPPED, Area

BACKENDS = ("memory", "file")


def open_backend(
    kind: str, capacity_pages: int, path: str | None = None, verify: bool = True
) -> PageBackend:
    """Build a backend by name; the file backend needs a directory."""
    if kind == "memory":
        return MemoryBackend(capacity_pages, verify)
    if kind == "file":
        if not path:
            raise ValueError("the file backend needs a path (--path DIR)")
        return FileBackend(path, capacity_pages, verify)
    raise ValueError(f"unknown backend {kind!r}; choose one of {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "UNMAPPED",
    "Area",
    "FileBackend",
    "MemoryBackend",
    "PageBackend",
    "open_backend",
]
