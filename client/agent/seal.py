"""Pages sealed on the host: AES-256-GCM, one nonce per (slot, write), never repeated.

Why AES-GCM through `cryptography` (OpenSSL): the page is encrypted in one
call with AES-NI and PCLMULQDQ where the CPU has them (OpenSSL picks its
aesni_gcm code at run time); a 12-byte nonce is all a deterministic scheme
needs, so XChaCha20's random 24-byte nonces buy nothing here, and Debian ships
`cryptography` for the Python nbdkit embeds.

The nonce is the slot (4 bytes) and the write's generation (8 bytes: epoch << 32
| count, slots.py), so under one key it never repeats: a slot's count only grows
(a trim keeps it), the epoch rises at every agent start above every epoch an agent
ever wrote under this key (the keyring records it, keys.py), and a fresh start
makes a new key. The associated data is the area's name: with the nonce, it binds
each ciphertext to (area, slot, generation), so a store that swaps two pages,
moves one to another area, or replays an older copy of a slot makes the read fail
its tag: EIO. The 16-byte GCM tag travels and is stored as the page's seal; the
store's own CRC tag (protocol/checksum.py) covers the ciphertext, so a misdirected
slot still fails at the store first.
"""

from __future__ import annotations

import struct
import threading
from array import array
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from netswap.protocol import PAGE_SIZE, SEAL_SIZE, page_tag

# Slots go into 4 bytes of the nonce: an encrypted area has at most 2^32 of them (16 TiB).
MAX_SEALED_SLOTS = 1 << 32
NONCE = struct.Struct(">IQ")


class KeyGone(Exception):
    """The area's key was dropped: nothing can be sealed or opened any more."""


class Sealer:
    """Seal and open pages; each thread works in its own preallocated scratch (ciphertext
    and tag are contiguous for the library, apart on the wire and in the reserve)."""

    def __init__(self, key: bytes, area: str) -> None:
        self._aead: AESGCM | None = AESGCM(key)
        self._aad = b"netswap page of " + area.encode()
        self._local = threading.local()

    def drop(self) -> None:
        """The key left the keyring: forget the cipher (its context holds the key)."""
        self._aead = None

    @property
    def usable(self) -> bool:
        return self._aead is not None

    def _scratch(self) -> memoryview:
        scratch: memoryview | None = getattr(self._local, "scratch", None)
        if scratch is None:  # once per thread: nbdkit's, and the agent's loop
            scratch = self._local.scratch = memoryview(bytearray(PAGE_SIZE + SEAL_SIZE))
        return scratch

    def seal_payloads(
        self, views: Sequence[memoryview], bufs: Sequence[int], lengths: Sequence[int],
        first: int, generations: Sequence[int], seed: int,
    ) -> tuple[array[int], bytearray]:  # fmt: skip
        """Encrypt each payload in place in its reserve buffer (slots from `first`); their
        tags (over the ciphertext, for the store's check) and seals."""
        aead = self._aead
        if aead is None:
            raise KeyGone
        seals = bytearray(len(bufs) * SEAL_SIZE)
        out, scratch, aad = memoryview(seals), self._scratch(), self._aad
        tags = array("I")
        for i, buf in enumerate(bufs):
            slot, generation, length = first + i, generations[i], lengths[i]
            payload = views[buf][:length]
            sealed = _encrypt(aead, NONCE.pack(slot, generation), payload, aad, scratch)
            payload[:] = sealed[:length]
            out[i * SEAL_SIZE : (i + 1) * SEAL_SIZE] = sealed[length : length + SEAL_SIZE]
            tags.append(page_tag(payload, seed, slot, generation))
        return tags, seals

    def open(self, out: memoryview, payload: memoryview, seal: memoryview, slot: int,
             generation: int) -> bool:  # fmt: skip
        """Decrypt `payload` (with its `seal`) into `out` (as long); False when it is not
        the slot's payload of that generation (or the key is gone)."""
        aead = self._aead
        if aead is None:
            return False
        length = len(payload)
        scratch = self._scratch()
        scratch[:length] = payload
        scratch[length : length + SEAL_SIZE] = seal
        try:
            _decrypt(aead, NONCE.pack(slot, generation), scratch[: length + SEAL_SIZE],
                     self._aad, out)  # fmt: skip
        except InvalidTag:
            return False
        return True


# cryptography >= 46 seals into and opens into a buffer of ours (the venv's, pyproject);
# an older one (Debian 12's 38, which the compose lab's image installs from apt) makes
# a bytes object per page and wants bytes in.
INTO = hasattr(AESGCM, "encrypt_into")


def _encrypt(aead: AESGCM, nonce: bytes, plain: memoryview, aad: bytes,
             scratch: memoryview) -> memoryview:  # fmt: skip
    if INTO:
        into = scratch[: len(plain) + SEAL_SIZE]
        aead.encrypt_into(nonce, plain, aad, into)
        return into
    return memoryview(aead.encrypt(nonce, bytes(plain), aad))


def _decrypt(aead: AESGCM, nonce: bytes, sealed: memoryview, aad: bytes,
             out: memoryview) -> None:  # fmt: skip
    if INTO:
        aead.decrypt_into(nonce, sealed, aad, out)
    else:
        out[:] = aead.decrypt(nonce, bytes(sealed), aad)


# Where the seal's code lives: hardening.trim_locked_text keeps locked what warm_up runs.
LIBRARY = "cryptography/hazmat/bindings/_rust"


def warm_up() -> None:
    """Run every path a page takes through the library, under a throwaway key: a seal,
    an open, and an open that fails its tag (a tampered page, keys.py's key gone)."""
    aead = AESGCM(bytes(32))
    scratch = memoryview(bytearray(PAGE_SIZE + SEAL_SIZE))
    out = memoryview(bytearray(PAGE_SIZE))
    sealed = _encrypt(aead, NONCE.pack(0, 0), memoryview(bytes(PAGE_SIZE)), b"warm", scratch)
    scratch[:] = sealed
    _decrypt(aead, NONCE.pack(0, 0), scratch, b"warm", out)
    try:
        _decrypt(aead, NONCE.pack(0, 1), scratch, b"warm", out)
    except InvalidTag:
        return
    raise AssertionError("a page opened under the wrong nonce")  # the library is broken
