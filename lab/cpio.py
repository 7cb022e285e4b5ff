"""A minimal cpio "newc" writer: enough to append files to a Linux initramfs.

The kernel unpacks concatenated initramfs archives in order, so the VM lab adds
a run's /plan.sh as a second, uncompressed archive after the cached guest image.
"""

from __future__ import annotations


def _entry(name: str, data: bytes, mode: int, ino: int) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
    header = b"070701" + b"".join(f"{f:08X}".encode() for f in fields)
    out = header + encoded
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def newc_archive(files: dict[str, bytes], mode: int = 0o100644) -> bytes:
    body = b"".join(_entry(n, d, mode, i + 1) for i, (n, d) in enumerate(files.items()))
    return body + _entry("TRAILER!!!", b"", 0, 0)
