"""A batch's commands and what their answers mean (sans-IO: no connection here).

A batch of runs is cut into chunk pieces (layout.py). A write is one WRITE script per
piece (scripts.py: the floor, the index made, newer payloads only, spliced into the
chunk's stream); a read is one FETCH per piece; an Inventory reads each chunk's index
whole. The answers are put back in the batch's order. A slot that holds nothing (a
chunk never made, a slot never written or discarded) reads as a page of zeros at
generation 0, as from a netswap store: held by no one, which the agent's proof makes
EIO, never a page.
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Sequence

from netswap.protocol import MAX_PAYLOAD, MIN_PAYLOAD, PAGE_SIZE, SEAL_SIZE, Pages, StoreError
from netswap.protocol.messages import Buffer

from .layout import (
    CHUNK_PAGES,
    GEN_SIZE,
    INDEX_BYTES,
    LEN_SIZE,
    LENS_AT,
    Piece,
    chunk_keys,
    floor_key_of,
    pieces,
)
from .router import Cmd
from .scripts import FETCH, WRITE

_ZERO_PAGE = bytes(PAGE_SIZE)


def write_cmds(area: str, epoch: int, runs: Sequence[range], pages: Sequence[Buffer],
               tags: array[int], generations: array[int],
               seals: Buffer | None) -> list[Cmd]:  # fmt: skip
    """One WRITE per piece, its payloads copied now (the caller's buffers may be reused).
    A payload of any length the protocol allows (1..PAGE_SIZE); another is EINVAL."""
    lengths = array("H")
    for page in pages:
        length = memoryview(page).nbytes
        if not MIN_PAYLOAD <= length <= MAX_PAYLOAD:
            raise StoreError(errno.EINVAL, f"a payload is {MIN_PAYLOAD}..{MAX_PAYLOAD} bytes, "
                             f"not {length}")  # fmt: skip
        lengths.append(length)
    cmds: list[Cmd] = []
    seal_view = memoryview(seals) if seals is not None else None
    for p in pieces(runs):
        ik, dk = chunk_keys(area, p.chunk)
        i, n = p.index, p.count
        data = b"".join(pages[i : i + n])
        sealed = (bytes(seal_view[i * SEAL_SIZE : (i + n) * SEAL_SIZE])
                  if seal_view is not None else b"")  # fmt: skip
        cmds.append(Cmd(ik, *WRITE.args([ik, dk, floor_key_of(area, p.chunk)], epoch, p.offset,
                                        n, data, lengths[i : i + n].tobytes(),
                                        generations[i : i + n].tobytes(),
                                        tags[i : i + n].tobytes(), sealed)))  # fmt: skip
    return cmds


def read_cmds(area: str, runs: Sequence[range], sealed: bool) -> tuple[list[Piece], list[Cmd]]:
    plan = list(pieces(runs))
    cmds = []
    for p in plan:
        ik, dk = chunk_keys(area, p.chunk)
        cmds.append(Cmd(ik, *FETCH.args([ik, dk], p.offset, p.count, int(sealed))))
    return plan, cmds


def pages_of(plan: list[Piece], cmds: list[Cmd], sealed: bool) -> Pages:
    """The read's answers as a store's Pages reply (unproven: the agent proves them).
    A chunk whose stream is shorter than its index says is EIO: its node lost part
    of it (a script is atomic, so only a failure outside netswap does that)."""
    total = sum(p.count for p in plan)
    parts: list[Buffer] = []
    lengths, gens, tags = array("H"), array("Q"), array("I")
    seals = bytearray(total * SEAL_SIZE) if sealed else None
    for p, cmd in zip(plan, cmds, strict=True):
        n, at = p.count, p.index
        got = [bytes(part) for part in cmd.result or ()]
        if not got:  # a chunk never made
            parts.extend([_ZERO_PAGE] * n)
            lengths.extend([PAGE_SIZE] * n)
            gens.extend([0] * n)
            tags.extend([0] * n)
            continue
        data, held = memoryview(got[0]), array("H", got[3])
        gens.frombytes(got[1])
        tags.frombytes(got[2])
        if sum(held) != len(data) or len(held) != n:
            raise StoreError(errno.EIO, f"chunk {p.chunk}: its stream does not match its index")
        place = 0
        for length in held:
            if length:
                parts.append(data[place : place + length])
                place += length
            else:  # nothing held: zeros at generation 0, as a netswap store answers
                parts.append(_ZERO_PAGE)
            lengths.append(length or PAGE_SIZE)
        if seals is not None:
            seals[at * SEAL_SIZE : (at + n) * SEAL_SIZE] = got[4]
    return Pages(0, b"".join(parts), tags, gens, seals, lengths)


def inventory_cmds(area: str, first: int, count: int) -> tuple[range, list[Cmd]]:
    chunks = range(first // CHUNK_PAGES, (first + count - 1) // CHUNK_PAGES + 1)
    cmds = [Cmd(i, "GET", i) for i in (chunk_keys(area, c)[0] for c in chunks)]
    return chunks, cmds


def held_of(chunks: range, cmds: list[Cmd], first: int,
            count: int) -> tuple[array[int], array[int], array[int]]:  # fmt: skip
    """The slots of first..first+count-1 held (generation not 0), their generations
    and their payloads' lengths."""
    slots, gens, lengths = array("Q"), array("Q"), array("H")
    for chunk, cmd in zip(chunks, cmds, strict=True):
        index = bytes(cmd.result or b"").ljust(INDEX_BYTES, b"\0")
        held = array("Q", index[: CHUNK_PAGES * GEN_SIZE])
        sizes = array("H", index[LENS_AT : LENS_AT + CHUNK_PAGES * LEN_SIZE])
        for i, gen in enumerate(held):
            slot = chunk * CHUNK_PAGES + i
            if gen and first <= slot < first + count:
                slots.append(slot)
                gens.append(gen)
                lengths.append(sizes[i])
    return slots, gens, lengths
