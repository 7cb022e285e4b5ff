"""A batch's commands and what their answers mean (sans-IO: no connection here).

A batch of runs is cut into chunk pieces (layout.py). A write is one WRITE script per
piece (scripts.py: the floor, the chunk made, newer pages only); a read is three
GETRANGEs per piece (page bytes, generations, tags) and a fourth for the seals; an
Inventory reads each chunk's generations region whole. The answers are put back in
the batch's order; a chunk never made reads as zeros at generation 0 (held by no one:
the agent's proof makes that EIO, never a page).
"""

from __future__ import annotations

import errno
from array import array
from collections.abc import Sequence

from netswap.protocol import PAGE_SIZE, SEAL_SIZE, Pages, StoreError
from netswap.protocol.messages import Buffer

from .layout import (
    CHUNK_PAGES,
    GEN_SIZE,
    SEALS_AT,
    TAG_SIZE,
    TAGS_AT,
    Piece,
    chunk_keys,
    floor_key_of,
    pieces,
)
from .router import Cmd
from .scripts import WRITE


def write_cmds(area: str, epoch: int, runs: Sequence[range], pages: Sequence[Buffer],
               tags: array[int], generations: array[int],
               seals: Buffer | None) -> list[Cmd]:  # fmt: skip
    """One WRITE per piece, its pages copied now (the caller's buffers may be reused).
    Whole pages only: a compressed payload (compress=lz4) is refused, never misplaced."""
    if any(len(memoryview(page)) != PAGE_SIZE for page in pages):
        raise StoreError(errno.EINVAL, "the cluster tier stores whole pages: compress=lz4 "
                         "is for netswap's stores")  # fmt: skip
    cmds: list[Cmd] = []
    seal_view = memoryview(seals) if seals is not None else None
    for p in pieces(runs):
        pk, mk = chunk_keys(area, p.chunk)
        i, n = p.index, p.count
        data = b"".join(bytes(pages[j]) for j in range(i, i + n))
        sealed = (bytes(seal_view[i * SEAL_SIZE : (i + n) * SEAL_SIZE])
                  if seal_view is not None else b"")  # fmt: skip
        cmds.append(Cmd(pk, *WRITE.args([pk, mk, floor_key_of(area, p.chunk)], epoch, p.offset,
                                        n, data, generations[i : i + n].tobytes(),
                                        tags[i : i + n].tobytes(), sealed)))  # fmt: skip
    return cmds


def read_cmds(area: str, runs: Sequence[range], sealed: bool) -> tuple[list[Piece], list[Cmd]]:
    plan = list(pieces(runs))
    cmds: list[Cmd] = []
    for p in plan:
        pk, mk = chunk_keys(area, p.chunk)
        off, n = p.offset, p.count
        cmds.append(Cmd(pk, "GETRANGE", pk, off * PAGE_SIZE, (off + n) * PAGE_SIZE - 1))
        cmds.append(Cmd(mk, "GETRANGE", mk, off * GEN_SIZE, (off + n) * GEN_SIZE - 1))
        cmds.append(Cmd(mk, "GETRANGE", mk, TAGS_AT + off * TAG_SIZE,
                        TAGS_AT + (off + n) * TAG_SIZE - 1))  # fmt: skip
        if sealed:
            cmds.append(Cmd(mk, "GETRANGE", mk, SEALS_AT + off * SEAL_SIZE,
                            SEALS_AT + (off + n) * SEAL_SIZE - 1))  # fmt: skip
    return plan, cmds


def pages_of(plan: list[Piece], cmds: list[Cmd], sealed: bool) -> Pages:
    """The read's answers as a store's Pages reply (unproven: the agent proves them)."""
    total = sum(p.count for p in plan)
    data, gens, tags = bytearray(total * PAGE_SIZE), array("Q"), array("I")
    seals = bytearray(total * SEAL_SIZE) if sealed else None
    step = 4 if sealed else 3
    for k, p in enumerate(plan):
        got = [bytes(c.result or b"") for c in cmds[k * step : (k + 1) * step]]
        n, at = p.count, p.index
        data[at * PAGE_SIZE : (at + n) * PAGE_SIZE] = got[0].ljust(n * PAGE_SIZE, b"\0")
        gens.frombytes(got[1].ljust(n * GEN_SIZE, b"\0"))  # a chunk never made: 0
        tags.frombytes(got[2].ljust(n * TAG_SIZE, b"\0"))
        if seals is not None:
            seals[at * SEAL_SIZE : (at + n) * SEAL_SIZE] = got[3].ljust(n * SEAL_SIZE, b"\0")
    return Pages(0, data, tags, gens, seals)


def inventory_cmds(area: str, first: int, count: int) -> tuple[range, list[Cmd]]:
    chunks = range(first // CHUNK_PAGES, (first + count - 1) // CHUNK_PAGES + 1)
    cmds = [Cmd(m, "GETRANGE", m, 0, TAGS_AT - 1)
            for m in (chunk_keys(area, c)[1] for c in chunks)]  # fmt: skip
    return chunks, cmds


def held_of(chunks: range, cmds: list[Cmd], first: int,
            count: int) -> tuple[array[int], array[int]]:  # fmt: skip
    """The slots of first..first+count-1 held (generation not 0), and their generations."""
    slots, gens = array("Q"), array("Q")
    for chunk, cmd in zip(chunks, cmds, strict=True):
        held = array("Q")
        held.frombytes(bytes(cmd.result or b"").ljust(TAGS_AT, b"\0"))
        for i, gen in enumerate(held):
            slot = chunk * CHUNK_PAGES + i
            if gen and first <= slot < first + count:
                slots.append(slot)
                gens.append(gen)
    return slots, gens
