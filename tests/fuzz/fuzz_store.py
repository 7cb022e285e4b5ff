"""`make fuzz`: a structured fuzzer of the page store's protocol, on a real store.

A store process on 127.0.0.1 (token file, --area-quota) takes frames from
FUZZERS connections at once, built to be almost right: valid messages with
edge-case fields (slots past the area, 2**40-slot areas, 1,024-range
discards, wrong page sizes, inventories past the area, fences at and past
other connections' floors, areas of other lives and holders, forced or not,
payloads of every length from 1 byte to a page),
valid frames with a byte flipped,
truncated, extended or given a wrong length prefix, lengths of 0, over a page
or not adding up to the frame, msgpack of the wrong shape, and raw noise; now
and then a Hello with a wrong token. Meanwhile one well-behaved client writes
tagged payloads of every class (whole pages, compressed-sized, same-filled
words) and reads every one back, verified.

It passes when: every connection the store closed was one that had sent a
malformed frame or a wrong token; the well-behaved client never saw an error
or a wrong page; the store's RSS stayed under RSS_BOUND_MIB; the store is
still alive at the end. The budget is in frames (--frames) or seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import struct
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from netswap.client.rpc import StoreClient
from netswap.lab.ports import free_port, wait_port
from netswap.protocol import (
    CLOSED,
    MAX_DISCARD_RANGES,
    MAX_INVENTORY_SLOTS,
    PAGE_SIZE,
    PROTOCOL_VERSION,
    Connection,
    Discard,
    Fence,
    Flush,
    Hello,
    Inventory,
    Message,
    RemoteProtocolError,
    Role,
    Stats,
    Swapfile,
    SwapIn,
    SwapOut,
    Welcome,
    encode,
)

FUZZERS = 8
TOKEN, GOOD_TOKEN = "fuzz-token", "good-token"
# What the store may hold: its code and heap (~40 MiB), the good client's pages (at
# most 2,048 distinct slots: 8 MiB), each fuzz area's quota (16 MiB) for the areas
# fuzzers create, and the unfinished-frame budget (68 MiB) -- with margin, 256 MiB.
RSS_BOUND_MIB = 256
GOOD_SLOTS = 2048


@dataclass
class Tally:
    frames: int = 0
    malformed: int = 0
    connections: int = 0
    closed_after_malformed: int = 0
    closed_clean: list[str] = field(default_factory=list)  # closed with no reason: a defect
    good_pages: int = 0
    rss_peak_kib: int = 0
    good_error: str = ""  # what stopped the well-behaved client, if anything did


def valid_message(rng: random.Random, rid: int) -> Message:
    """A well-formed request with fields at or past their edges."""
    kind = rng.randrange(8)
    slot = rng.choice([0, 1, 255, 256, 4095, 1 << 20, (1 << 40) - 1, rng.randrange(1 << 16)])
    if kind == 0:
        pages = rng.choice([1, 16, 4096, 1 << 28, 1 << 32, 1 << 40])
        # Lives and holders that agree and disagree: grows, replacements, EEXIST.
        area_id, holder = rng.choice([0, 1, 2, (1 << 64) - 1]), rng.choice(["", "a", "b" * 128])
        return Swapfile(rid, rng.random() < 0.9, pages, rng.choice([4096, 4096, 512, 65536]),
                        area_id, holder, rng.random() < 0.1)  # fmt: skip
    if kind == 7:  # epochs at and past others' floors: ESTALE from then on
        return Fence(rid, rng.choice([0, 1, 2, rng.randrange(1 << 32), (1 << 64) - 1]))
    if kind == 1:
        n = rng.choice([1, 2, 8, 256])
        slots = tuple(sorted({slot + i * rng.choice([1, 256]) for i in range(n)}))
        slots = tuple(s for s in slots if s < 1 << 40)
        lengths = [payload_length(rng) for _ in slots] if rng.random() < 0.5 else None
        size = sum(lengths) if lengths is not None else len(slots) * PAGE_SIZE
        gens = bytes(rng.randrange(1, 256) for _ in slots)
        tags = tuple(rng.randrange(1 << 32) for _ in slots)
        return SwapOut(rid, slots, rng.randbytes(size), tags, gens, None, lengths)
    if kind == 2:
        return SwapIn(rid, tuple(sorted({slot, rng.randrange(1 << 12)})))
    if kind == 3:
        n = rng.choice([1, 4, MAX_DISCARD_RANGES])
        return Discard(rid, tuple((rng.randrange(1 << 30), 1 << 20) for _ in range(n)))
    if kind == 4:
        return Flush(rid)
    if kind == 5:
        return Stats(rid)
    return Inventory(rid, slot, rng.choice([1, 256, MAX_INVENTORY_SLOTS]))


def payload_length(rng: random.Random) -> int:
    """A payload's length: what the agent sends (whole, granules, a word) or any other."""
    edge = rng.choice([1, 9, 255, 257, 3841, 4095])
    return rng.choice([PAGE_SIZE, PAGE_SIZE, 8, 256 * rng.randint(1, 12), edge,
                       rng.randint(1, PAGE_SIZE)])  # fmt: skip


def bad_lengths(rng: random.Random, rid: int) -> bytes:
    """A SwapOut whose lengths are wrong: 0, over a page, or not the frame's size."""
    n = rng.randint(1, 8)
    lengths = [payload_length(rng) for _ in range(n)]
    if set(lengths) == {PAGE_SIZE}:  # whole pages carry no lengths: make one shorter
        lengths[-1] = 100
    good = encode(SwapOut(rid, range(n), bytes(sum(lengths)), [0] * n, [1] * n, None, lengths))
    frame = bytearray(good)
    at = 4 + 8 + 8 + 8 + 12 * n  # length, head, runs' count, the run, generations, tags
    i = rng.randrange(n)
    (held,) = struct.unpack_from("<H", frame, at + 2 * i)
    wrong = rng.choice([0, PAGE_SIZE + 1, 0xFFFF, held + 1])
    struct.pack_into("<H", frame, at + 2 * i, wrong)
    return bytes(frame)


def malformed_frame(rng: random.Random, rid: int) -> bytes:
    """A frame the store must refuse, by closing this connection only."""
    frame = bytearray(encode(valid_message(rng, rid)))
    kind = rng.randrange(8)
    if kind == 7:
        return bad_lengths(rng, rid)
    if kind == 0 and len(frame) > 5:  # one flipped bit in the body
        frame[rng.randrange(4, len(frame))] ^= 1 << rng.randrange(8)
        return bytes(frame)
    if kind == 1:  # a length prefix longer than the frame, then the next frame
        return struct.pack(">I", len(frame) - 4 + rng.randrange(1, 64)) + bytes(frame[4:])
    if kind == 2:  # a zero or oversized length
        return struct.pack(">I", rng.choice([0, (2 << 20), 0xFFFFFFFF]))
    if kind == 3:  # msgpack of the wrong shape
        body: Any = rng.choice([
            {"type": 3}, [3], [3, rid, "slots", b"", (), b""], [99, rid], "x" * 50,
            [3, rid, [1, 1], b"\0" * 8192, [0, 0], b"\1\1"], [4, -1, [0]], [1, rid, 2, "a", None],
        ])  # fmt: skip
        packed = msgpack.packb(body, use_bin_type=True)
        return struct.pack(">I", len(packed)) + packed
    if kind == 4:  # noise
        return rng.randbytes(rng.randrange(1, 300))
    if kind == 5:  # a reply where a request belongs
        packed = msgpack.packb([64, rid], use_bin_type=True)
        return struct.pack(">I", len(packed)) + packed
    packed = msgpack.packb([3, rid, [0], b"\0" * 10, [0], b"\1"], use_bin_type=True)  # short data
    return struct.pack(">I", len(packed)) + packed


async def fuzzer(n: int, port: int, tally: Tally, stop: asyncio.Event, budget: int) -> None:
    rng = random.Random(n)
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        tally.connections += 1
        area = f"fuzz{n}-{rng.randrange(4)}"
        wrong = rng.random() < 0.01
        writer.write(encode(Hello(1, PROTOCOL_VERSION, area, "guess" if wrong else TOKEN)))
        tally.frames += 1
        sent_bad = wrong
        try:
            sent_bad = await send_frames(rng, writer, tally, stop, budget, sent_bad)
            if wrong:  # its answer waits out the source's throttle: nothing more to learn
                writer.close()
                continue
            await writer.drain()
            writer.write_eof()  # a frame cut short is malformed only once no more comes
            closed = await _closed(reader, 15)
            if sent_bad:
                tally.closed_after_malformed += closed
            elif closed and not reader.at_eof():
                tally.closed_clean.append(area)
        except OSError:  # reset, or not connected any more
            if not sent_bad:
                tally.closed_clean.append(f"{area} (reset)")
        writer.close()
        if tally.frames >= budget:
            stop.set()


async def send_frames(rng: random.Random, writer: asyncio.StreamWriter, tally: Tally,
                      stop: asyncio.Event, budget: int, sent_bad: bool) -> bool:  # fmt: skip
    """Up to 40 frames on one connection, ending with the first malformed one."""
    rid = 2
    for _ in range(rng.randrange(1, 40)):
        if sent_bad or stop.is_set() or tally.frames >= budget:
            break
        if rng.random() < 0.1:
            frame = malformed_frame(rng, rid)
            writer.write(frame)
            # Some mutations stay valid (a bit flipped in page data): the sans-IO
            # decoder, fed as the store feeds it, says which are not.
            sent_bad = is_malformed(frame)
            tally.malformed += sent_bad
        else:
            writer.write(encode(valid_message(rng, rid)))
        tally.frames += 1
        rid += 1
        if rid % 8 == 0:
            await writer.drain()
    return sent_bad


def is_malformed(frame: bytes) -> bool:
    """Would a store refuse this frame, sent after a Hello and followed by EOF?"""
    conn = Connection(Role.SERVER)
    conn.receive_data(encode(Hello(1, PROTOCOL_VERSION, "x", TOKEN)))
    conn.next_event()
    conn.send(Welcome(1, PROTOCOL_VERSION, 0, 0))  # batches' layout from here, as a store's
    conn.receive_data(frame)
    conn.receive_data(b"")
    try:
        while conn.next_event() is not CLOSED:
            pass
    except RemoteProtocolError:
        return True
    return False


async def _closed(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(1 << 16):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def good_client(port: int, tally: Tally, stop: asyncio.Event) -> None:
    """Writes and verifies payloads the whole time, batches of whole pages and of
    payloads of every length; any error ends the run as a failure."""
    rng = random.Random(0)
    client = await StoreClient.connect("127.0.0.1", port, "good", GOOD_TOKEN, deadline=30)
    await client.swapfile(True, GOOD_SLOTS)
    gens = array("Q", [0]) * GOOD_SLOTS  # each write newer: the store keeps only newer pages
    truth: dict[int, bytes] = {}
    while not stop.is_set():
        slots = rng.sample(range(GOOD_SLOTS), 8)
        whole = rng.random() < 0.5
        payloads = [rng.randbytes(PAGE_SIZE if whole else payload_length(rng)) for _ in slots]
        for s in slots:
            gens[s] += 1
        written = [gens[s] for s in slots]
        if whole:
            await client.swap_out(slots, b"".join(payloads), written)  # it tags them
        else:
            await client.swap_out(slots, payloads, written)
        truth.update(zip(slots, payloads, strict=True))
        check = rng.sample(sorted(truth), min(8, len(truth)))
        got = await client.swap_in_payloads(check, [gens[s] for s in check])
        for s, payload in zip(check, got, strict=True):
            if payload != truth[s]:
                raise AssertionError(f"good client: slot {s} read back wrong")
        tally.good_pages += len(check)
        await asyncio.sleep(0.002)
    await client.close()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def sample_rss(pid: int, tally: Tally, stop: asyncio.Event) -> None:
    while not stop.is_set():
        tally.rss_peak_kib = max(tally.rss_peak_kib, rss_kib(pid))
        await asyncio.sleep(0.2)


async def campaign(port: int, pid: int, frames: int, seconds: float) -> Tally:
    tally, stop = Tally(), asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    good = asyncio.ensure_future(good_client(port, tally, stop))
    tasks = [asyncio.ensure_future(fuzzer(n, port, tally, stop, frames)) for n in range(FUZZERS)]
    tasks.append(asyncio.ensure_future(sample_rss(pid, tally, stop)))
    began = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(1)
        if good.done():
            stop.set()
        print(f"  {time.monotonic() - began:5.0f}s frames {tally.frames} malformed "
              f"{tally.malformed} connections {tally.connections} good pages verified "
              f"{tally.good_pages} store RSS peak {tally.rss_peak_kib // 1024} MiB",
              flush=True)  # fmt: skip
    await asyncio.gather(*tasks)
    try:
        await good
    except Exception as exc:  # a wrong page, an error, a refused connection: the verdict
        tally.good_error = f"{type(exc).__name__}: {exc}"
    return tally


def run(frames: int, seconds: float, workdir: Path, store_args: tuple[str, ...] = ()) -> Tally:
    workdir.mkdir(parents=True, exist_ok=True)
    tokens = workdir / "tokens"
    tokens.write_text(f"{TOKEN}\ngood {GOOD_TOKEN}\n")
    port = free_port()
    store = subprocess.Popen(
        [sys.executable, "-m", "netswap.client.cli", "store", "--listen", f"127.0.0.1:{port}",
         "--capacity", "512M", "--area-quota", "16M", "--token-file", str(tokens),
         *store_args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port, lambda: store.poll() is None, 15)
        tally = asyncio.run(campaign(port, store.pid, frames, seconds))
        if store.poll() is not None:
            raise AssertionError(f"the store died (exit {store.returncode})")
        return tally
    finally:
        store.kill()
        store.wait()


def verdict(tally: Tally) -> list[str]:
    """What went wrong; empty when the run passed."""
    problems = []
    if tally.good_error:
        problems.append(f"the well-behaved client failed: {tally.good_error}")
    if tally.closed_clean:
        problems.append(f"store closed well-behaved connections: {tally.closed_clean[:5]}")
    if tally.closed_after_malformed < tally.malformed * 0.99:
        problems.append(f"only {tally.closed_after_malformed} of {tally.malformed} malformed "
                        "frames closed their connection")  # fmt: skip
    if tally.rss_peak_kib > RSS_BOUND_MIB * 1024:
        problems.append(f"store RSS peaked at {tally.rss_peak_kib // 1024} MiB > {RSS_BOUND_MIB}")
    if not tally.good_pages:
        problems.append("the well-behaved client verified nothing")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(prog="make fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--workdir", type=Path, default=Path(".cache/fuzz"))
    args = parser.parse_args()
    tally = run(args.frames, args.seconds, args.workdir)
    problems = verdict(tally)
    print(f"fuzz: {tally.frames} frames ({tally.malformed} malformed) over "
          f"{tally.connections} connections; the good client verified {tally.good_pages} "
          f"pages; store RSS peak {tally.rss_peak_kib // 1024} MiB "
          f"(bound {RSS_BOUND_MIB})")  # fmt: skip
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
