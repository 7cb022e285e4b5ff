"""The files a starting nbdkit reads, handed down from memory that never leaves RAM.

The plugin reads its secrets and certificates as it loads (nbd/config.py): the
stores' token, the ops endpoint's, the TLS files. A spare reads them long before it
serves; a cold start (no spare: --no-standby, a host too small for one) reads them
while the kernel holds the device's IO -- and on tmpfs (/run, or all of / on a
diskless host) a file's page may be on that very device. Seen in the 224 MiB
guest: a cold start in shmem_swapin_folio, reading /run/netswap/ops-token, until
the dead-connection timeout failed the device. So the supervisor reads each file
once, at its start (swap moving), into a memfd it maps -- locked with the rest of
it by mlockall -- and every nbdkit it starts inherits the memfd and reads
KEY=/proc/self/fd/N: pages in RAM, whatever happens to the file.
"""

from __future__ import annotations

import mmap
import os

# The plugin's keys that name a file it reads at load (nbd/config.py).
FILE_KEYS = ("token-file", "http-token-file", "store-tls-ca", "tls-cert", "tls-key")
# A token is a line, a certificate chain a few KiB: a file larger than this is not one
# of them, and would cost the supervisor its locked size.
MAX_FILE = 256 * 1024


class HeldFiles:
    """nbdkit's argv with each file key's value replaced by a memfd of the file."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self._maps: list[mmap.mmap] = []

    def hold(self, argv: list[str]) -> list[str]:
        out = []
        for arg in argv:
            key, sep, path = arg.partition("=")
            if sep and key in FILE_KEYS and path and not path.startswith("/proc/self/fd/"):
                arg = f"{key}=/proc/self/fd/{self._held(key, path)}"
            out.append(arg)
        return out

    def _held(self, key: str, path: str) -> int:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
        if len(data) > MAX_FILE:
            raise ValueError(f"{key}={path} is larger than {MAX_FILE // 1024} KiB")
        fd = os.memfd_create(f"netswap-{key}", 0)  # no MFD_CLOEXEC: nbdkit inherits it
        os.set_inheritable(fd, True)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if data:  # mapped, so that mlockall keeps its pages resident for good
            self._maps.append(mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ))
        self.fds.append(fd)
        return fd
