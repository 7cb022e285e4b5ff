"""Who this host is to the stores: the holder an area's record names (#30).

A store keeps, with each area, the host that holds it; another host asking for
the area is refused with that name (a host whose name was copied, or an image
started twice, must not release a live host's swap). The holder is the host
name an operator recognises, and a digest of the machine id with the area
name -- systemd's /etc/machine-id, unique per installation and stable across
reboots -- so two hosts that share a name still differ, and the stores learn
neither the machine id nor anything that links one host's areas together.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")
# The store bounds a holder (protocol/limits.py MAX_HOLDER); a host name is at most 64.
DIGEST_CHARS = 16


def machine_id() -> str:
    """$NETSWAP_MACHINE_ID (containers of one image share their machine id; tests play
    two hosts on one), else systemd's machine id, else ""."""
    override = os.environ.get("NETSWAP_MACHINE_ID", "").strip()
    if override:
        return override
    for path in MACHINE_ID_FILES:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text:
            return text
    return ""


def holder_id(area: str, machine: str | None = None, name: str | None = None) -> str:
    """`NAME/DIGEST`; just NAME where the host has no machine id (said by the caller)."""
    machine = machine_id() if machine is None else machine
    name = (name or socket.gethostname() or "host")[:64]
    if not machine:
        return name
    digest = hashlib.sha256(f"{machine}:{area}".encode()).hexdigest()[:DIGEST_CHARS]
    return f"{name}/{digest}"
