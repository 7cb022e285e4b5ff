"""What netswap's command lines and plugin keys accept: sizes and addresses.

Every netswap process parses these -- the store, `serve`, the plugin's
key=value pairs, the labs -- so they live once, here, at the bottom of the
host side's imports. A value that does not parse raises ValueError with a
message naming it; commands turn that into a UsageError (one line, exit 2).
"""

from __future__ import annotations

import ipaddress
import re

_SIZE = re.compile(r"\s*(\d+)\s*([KMGTP]?)(i?B)?\s*\Z", re.IGNORECASE)
_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50}


class UsageError(Exception):
    """Bad command line or configuration: printed as one line, exit status 2."""


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


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """'HOST:PORT', 'HOST' or '[V6]:PORT' -> (host, port)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, ""
    if not host:
        raise ValueError(f"no host in {text!r}")
    try:
        number = int(port) if port else default_port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, number


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_secret(path: str) -> str:
    """A token kept in a file: its first line, stripped; an empty file is an error."""
    with open(path) as f:
        token = f.readline().strip()
    if not token:
        raise ValueError(f"{path}: no token in it")
    return token
