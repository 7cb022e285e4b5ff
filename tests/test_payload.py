"""The agent's page payloads (client/agent/payload.py): every kind round-trips, and a payload
the module never makes is refused (the read answers EIO), never decoded into a page. (A
damaged payload never gets here: its tag, and sealed its seal, fail first.)"""

from __future__ import annotations

import os

import pytest
from netswap.client.agent.payload import FILL, GRANULE, THRESHOLD, decode, encode
from netswap.protocol import PAGE_SIZE


def roundtrip(page: bytes, compress: bool = True) -> int:
    out = memoryview(bytearray(PAGE_SIZE))
    length = encode(memoryview(page), out, compress)
    back = memoryview(bytearray(PAGE_SIZE))
    assert decode(out[:length], back)
    assert bytes(back) == page
    return length


def test_same_filled_pages_are_their_word() -> None:
    assert roundtrip(bytes(PAGE_SIZE)) == FILL
    assert roundtrip(b"\x01\x02\x03\x04\x05\x06\x07\x08" * 512) == FILL
    almost = bytearray(PAGE_SIZE)
    almost[-1] = 1  # one byte off: not same-filled
    assert roundtrip(bytes(almost)) != FILL


def test_compressible_pages_take_granules_and_the_rest_go_whole() -> None:
    text = (b"netswap keeps pages on stores; " * 200)[:PAGE_SIZE]
    length = roundtrip(text)
    assert length % GRANULE == 0 and GRANULE <= length <= THRESHOLD
    assert roundtrip(os.urandom(PAGE_SIZE)) == PAGE_SIZE  # incompressible: whole
    assert roundtrip(text, compress=False) == PAGE_SIZE  # compress=off: whole
    half = os.urandom(PAGE_SIZE // 2) + bytes(PAGE_SIZE // 2)
    assert roundtrip(half) == 2304  # 2,048 random bytes + a little: the 9th granule


@pytest.mark.parametrize("length", [0, 7, 9, 300, 3328, 4095])
def test_a_payload_of_a_length_never_made_is_refused(length: int) -> None:
    assert not decode(memoryview(bytes(length)), memoryview(bytearray(PAGE_SIZE)))


def test_a_damaged_compressed_payload_is_refused_not_decoded() -> None:
    text = (b"abcdefgh" * 300 + os.urandom(1500))[:PAGE_SIZE]
    out = memoryview(bytearray(PAGE_SIZE))
    length = encode(memoryview(text), out)
    assert GRANULE <= length <= THRESHOLD
    wrong = bytearray(out[:length])
    wrong[0:2] = (length).to_bytes(2, "little")  # a header longer than the block
    assert not decode(memoryview(wrong), memoryview(bytearray(PAGE_SIZE)))
    short = bytearray(out[:length])
    short[0:2] = (10).to_bytes(2, "little")  # a block cut short gives no whole page
    assert not decode(memoryview(short), memoryview(bytearray(PAGE_SIZE)))
