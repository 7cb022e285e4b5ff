"""Human sizes ('4G', '512M', '16384K', '4096') as the CLI and plugin accept them."""

from __future__ import annotations

import re

_SIZE = re.compile(r"\s*(\d+)\s*([KMGTP]?)(i?B)?\s*\Z", re.IGNORECASE)
_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}


def parse_size(text: str) -> int:
    """Binary units, as nbdkit and swap tools use them: 4G = 4 * 2**30 bytes."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"bad size {text!r} (expected e.g. 4096, 512M, 4G)")
    return int(match.group(1)) << _SHIFT[match.group(2).upper()]


def format_size(n: int) -> str:
    for unit, shift in (("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)
