"""The area's key: in the kernel's keyring, never on disk, never sent, never logged.

A fresh start makes a new random 256-bit key and puts it in root's user
keyring (`netswap:AREA`, root-only: uid 0 may read it, no one else may view
it), replacing any earlier one: a fresh area's generations start again, so
they must never meet an earlier key. A restart (start=rebuild) reads the one
the dead agent used. The keyring outlives nbdkit but not the boot, which is
the life swap has: a reboot leaves only ciphertext on the stores, and detach
unlinks the key. Beside it `netswap:AREA:epoch` records the highest epoch
an agent has written under that key (slots.py: the nonce argument needs every
restart's epoch above it, even when the stores that hold its pages are away).

In the process, the key lives in one locked page excluded from core dumps
(MADV_DONTDUMP), and the process itself is made non-dumpable; OpenSSL keeps
its own expanded copy inside the cipher context.

The keyring is reached through add_key(2) and keyctl(2), by syscall: no
keyutils library needed. A host or container that refuses them (seccomp)
gets one clear line: encryption needs the keyring, or --no-encrypt.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import mmap
import os
import struct

from .machine.record import HEADER, Record

KEY_BYTES = 32  # AES-256
SYS_ADD_KEY, SYS_KEYCTL = 248, 250  # x86_64 <asm/unistd_64.h>
KEY_SPEC_USER_KEYRING = -4
KEYCTL_SETPERM, KEYCTL_UNLINK, KEYCTL_SEARCH, KEYCTL_READ = 5, 9, 10, 11
# Possessor and user (uid 0) may do everything; group and other nothing.
KEY_PERM = 0x3F3F0000
PR_SET_DUMPABLE, MADV_DONTDUMP = 4, 16


class KeyringError(OSError):
    """The keyring refused, or holds no key for the area."""


@functools.cache  # once: each CDLL makes a class of its own, and the record is saved at
def _libc() -> ctypes.CDLL:  # every change (the soak's tracemalloc: ctypes:370, +43 KiB/10 min)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        hint = (" (a container's seccomp profile? run with --no-encrypt, or allow keyctl)"
                if code in (errno.ENOSYS, errno.EPERM) else "")  # fmt: skip
        raise KeyringError(code, f"{what}: {os.strerror(code)}{hint}")
    return result


def _add(description: str, payload: bytes) -> int:
    libc = _libc()
    serial = _check(libc.syscall(SYS_ADD_KEY, b"user", description.encode(), payload,
                                 ctypes.c_size_t(len(payload)),
                                 ctypes.c_int(KEY_SPEC_USER_KEYRING)), "add_key")  # fmt: skip
    _check(libc.syscall(SYS_KEYCTL, ctypes.c_int(KEYCTL_SETPERM), ctypes.c_int(serial),
                        ctypes.c_uint(KEY_PERM)), "keyctl setperm")  # fmt: skip
    return serial


def _search(description: str) -> int:
    """The key's serial; ENOKEY (as KeyringError) when the keyring holds none."""
    libc = _libc()
    return _check(libc.syscall(SYS_KEYCTL, ctypes.c_int(KEYCTL_SEARCH),
                               ctypes.c_int(KEY_SPEC_USER_KEYRING), b"user",
                               description.encode(), ctypes.c_int(0)), "keyctl search")  # fmt: skip


def _read(serial: int, into: ctypes.Array[ctypes.c_char]) -> int:
    libc = _libc()
    return _check(libc.syscall(SYS_KEYCTL, ctypes.c_int(KEYCTL_READ), ctypes.c_int(serial),
                               into, ctypes.c_size_t(len(into))), "keyctl read")  # fmt: skip


def key_name(area: str) -> str:
    return f"netswap:{area}"


class AreaKey:
    """The key's bytes in a locked, undumpable page, and the keyring entry it came from."""

    def __init__(self, area: str, serial: int, page: mmap.mmap) -> None:
        self.area, self.serial, self._page = area, serial, page

    @classmethod
    def fresh(cls, area: str) -> AreaKey:
        page = _secret_page()
        page[:KEY_BYTES] = os.urandom(KEY_BYTES)
        serial = _add(key_name(area), bytes(page[:KEY_BYTES]))
        _add(key_name(area) + ":epoch", struct.pack("<Q", 0))
        return cls(area, serial, page)

    @classmethod
    def existing(cls, area: str) -> AreaKey:
        serial = _search(key_name(area))
        raw = (ctypes.c_char * KEY_BYTES)()
        if _read(serial, raw) != KEY_BYTES:
            raise KeyringError(errno.EINVAL, f"{key_name(area)} is not a {KEY_BYTES}-byte key")
        page = _secret_page()
        page[:KEY_BYTES] = bytes(raw)
        ctypes.memset(raw, 0, KEY_BYTES)
        return cls(area, serial, page)

    @property
    def material(self) -> bytes:
        return bytes(self._page[:KEY_BYTES])

    def present(self) -> bool:
        """Is this key still in the keyring (detach, or an operator, may drop it)?"""
        try:
            return _search(key_name(self.area)) == self.serial
        except KeyringError:
            return False

    def forget(self) -> None:
        self._page[:KEY_BYTES] = bytes(KEY_BYTES)

    # -- the epoch beside it -------------------------------------------------------
    def last_epoch(self) -> int:
        try:
            raw = (ctypes.c_char * 8)()
            if _read(_search(key_name(self.area) + ":epoch"), raw) == 8:
                return int(struct.unpack("<Q", bytes(raw))[0])
        except KeyringError:
            pass
        return 0

    def record_epoch(self, epoch: int) -> None:
        _add(key_name(self.area) + ":epoch", struct.pack("<Q", epoch))


def drop_key(area: str) -> bool:
    """Unlink the area's key, its epoch and its record (detach); False when there was none."""
    names = [key_name(area), key_name(area) + ":epoch", cluster_name(area)]
    names += [f"{record_prefix(area)}{part}" for part in _record_parts(area)]
    dropped = False
    for name in names:
        dropped = _unlink(name) or dropped
    return dropped


def _unlink(name: str) -> bool:
    try:
        serial = _search(name)
    except KeyringError:
        return False
    libc = _libc()
    _check(libc.syscall(SYS_KEYCTL, ctypes.c_int(KEYCTL_UNLINK), ctypes.c_int(serial),
                        ctypes.c_int(KEY_SPEC_USER_KEYRING)), "keyctl unlink")  # fmt: skip
    return True


def cluster_name(area: str) -> str:
    """The cluster tier's lineage record (client/cluster/lineage.py), beside the key."""
    return key_name(area) + ":cluster"


class KeyringEntry:
    """One small entry in root's keyring, read and replaced whole: how the cluster tier's
    client, a lower layer, keeps its lineage record where the agent keeps its own."""

    def __init__(self, name: str) -> None:
        self.name = name

    def load(self) -> bytes | None:
        try:
            return _read_part(self.name)
        except KeyringError as exc:
            if exc.errno == errno.ENOKEY:
                return None
            raise

    def save(self, payload: bytes) -> None:
        _add(self.name, payload)


# -- the area's durable record (machine/record.py), beside the key ----------------------
# A keyring entry's payload is at most 32,767 bytes (key_type_user); the record's parts
# are smaller (record.CHUNK_BYTES).
MAX_PART = 32 * 1024


def record_prefix(area: str) -> str:
    return f"netswap:{area}:record"


def _read_part(name: str) -> bytes:
    raw = (ctypes.c_char * MAX_PART)()
    size = _read(_search(name), raw)
    if size > MAX_PART:
        raise KeyringError(errno.EFBIG, f"{name}: {size} bytes, more than a part holds")
    return raw.raw[:size]


def _record_parts(area: str) -> list[str]:
    """The names (after the prefix) of the record's entries now in the keyring."""
    try:
        head = _read_part(record_prefix(area))
    except KeyringError:
        return []
    parts = {HEADER: head}
    return ["", *(":" + k for k in Record.chunk_keys(parts) + Record.lost_keys(parts))]


PROBE = "netswap:probe"


def keyring_usable() -> bool:
    """Can this process keep entries in root's keyring? Probed by doing what the record's
    writes do -- add_key, then keyctl setperm -- and unlinking the probe: a container may
    search the keyring but not keep entries in it (Docker's seccomp refuses keyctl: EPERM;
    podman lets add_key and search through but refuses setperm: EACCES), and a search
    alone took podman's for usable, so every write of the record failed (EIO)."""
    try:
        _add(PROBE, b"\0")  # a user key holds 1 to 32,767 bytes: empty is EINVAL
    except KeyringError as exc:
        return exc.errno not in (errno.ENOSYS, errno.EPERM, errno.EACCES)
    finally:
        with contextlib.suppress(KeyringError):
            _unlink(PROBE)
    return True


class RecordKeeper:
    """The area's record in root's keyring: read once at a restart, written whenever the
    machine changed it -- only the entries whose bytes changed, each replaced atomically
    (add_key on an existing description updates it in place)."""

    def __init__(self, area: str) -> None:
        self.prefix = record_prefix(area)
        self._written: dict[str, bytes] = {}
        self.writes = 0

    def load(self) -> Record | None:
        """The record an earlier agent left, or None when there is none."""
        try:
            head = _read_part(self.prefix)
        except KeyringError as exc:
            if exc.errno == errno.ENOKEY:
                return None
            raise
        parts = {HEADER: head}
        for name in Record.chunk_keys(parts) + Record.lost_keys(parts):
            parts[name] = _read_part(f"{self.prefix}:{name}")
        self._written = dict(parts)
        return Record.decode(parts)

    def save(self, record: Record) -> None:
        parts = record.encode()
        for name, payload in parts.items():  # the parts first, the header that names them last
            if name != HEADER and self._written.get(name) != payload:
                _add(f"{self.prefix}:{name}", payload)
        if self._written.get(HEADER) != parts[HEADER]:
            _add(self.prefix, parts[HEADER])
        for gone in set(self._written) - set(parts):
            _unlink(f"{self.prefix}:{gone}")
        self._written = parts
        self.writes += 1


def _secret_page() -> mmap.mmap:
    """One anonymous page, locked and left out of core dumps; the process too."""
    page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    page.madvise(MADV_DONTDUMP)
    libc = _libc()
    anchor = ctypes.c_char.from_buffer(page)
    libc.mlock(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(mmap.PAGESIZE))
    del anchor
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    return page
