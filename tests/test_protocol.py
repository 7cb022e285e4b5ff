"""The sans-IO protocol: round trips, validation, and hostile bytes."""

from __future__ import annotations

import errno
import itertools
import random
import struct
from array import array

import netswap.protocol as p
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from netswap.protocol import (
    CLOSED,
    NEED_DATA,
    PAGE_SIZE,
    Connection,
    LocalProtocolError,
    RemoteProtocolError,
    Role,
)
from netswap.protocol.codec import encode_parts

ids = st.integers(0, 2**32 - 1)
slot_lists = st.one_of(
    st.lists(st.integers(0, p.MAX_SLOTS - 1), min_size=1, max_size=8, unique=True),
    st.builds(lambda first, n: range(first, first + n), st.integers(0, 2**40 - 9),
              st.integers(1, 8)),
)  # fmt: skip
crc = st.integers(0, 2**32 - 1)
gen = st.integers(1, 2**64 - 1)


# A payload's length: a whole page, a granule class, a same-filled word, or any other.
payload_lengths = st.one_of(
    st.just(PAGE_SIZE), st.sampled_from([256 * g for g in range(1, 13)]), st.just(8),
    st.integers(p.MIN_PAYLOAD, p.MAX_PAYLOAD),
)  # fmt: skip


@st.composite
def payloads(draw: st.DrawFn, n: int) -> tuple[bytes, list[int] | None]:
    """n payloads back to back, and their lengths (None: whole pages, no lengths)."""
    if draw(st.booleans()):
        return draw(st.binary(min_size=n * PAGE_SIZE, max_size=n * PAGE_SIZE)), None
    lengths = [draw(payload_lengths) for _ in range(n)]
    return draw(st.binary(min_size=sum(lengths), max_size=sum(lengths))), lengths


@st.composite
def swap_outs(draw: st.DrawFn) -> p.SwapOut:
    slots = draw(slot_lists)
    n = len(slots)
    data, lengths = draw(payloads(n))
    seals = draw(st.one_of(st.none(), st.binary(min_size=16 * n, max_size=16 * n)))
    tags = [draw(crc) for _ in range(n)]
    gens = [draw(gen) for _ in range(n)]
    return p.SwapOut(draw(ids), slots, data, tags, gens, seals, lengths)


@st.composite
def pages_replies(draw: st.DrawFn) -> p.Pages:
    n = draw(st.integers(1, 4))
    data, lengths = draw(payloads(n))
    seals = draw(st.one_of(st.none(), st.binary(min_size=16 * n, max_size=16 * n)))
    gens = [draw(st.integers(0, 2**64 - 1)) for _ in range(n)]
    return p.Pages(draw(ids), data, [draw(crc) for _ in range(n)], gens, seals, lengths)


area_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True)
u64 = st.integers(0, 2**64 - 1)
holders = st.text(
    st.characters(codec="utf-8", categories=("L", "N", "P"), include_characters=" "), max_size=32
)
requests = st.one_of(
    st.builds(
        p.Swapfile,
        ids,
        st.booleans(),
        st.integers(0, p.MAX_SLOTS),
        st.just(PAGE_SIZE),
        u64,
        holders,
        st.booleans(),
    ),
    st.builds(p.Fence, ids, u64),
    swap_outs(),
    st.builds(p.SwapIn, ids, slot_lists, st.booleans()),
    st.builds(
        p.Discard,
        ids,
        st.lists(
            st.tuples(st.integers(0, 2**30), st.integers(1, 2**20)), min_size=1, max_size=5
        ).map(tuple),
    ),
    st.builds(p.Flush, ids),
    st.builds(p.Stats, ids),
    st.builds(p.Inventory, ids, st.integers(0, 2**39), st.integers(1, p.MAX_INVENTORY_SLOTS)),
)
replies = st.one_of(
    st.builds(p.Ok, ids),
    st.builds(
        p.Failed, ids, st.sampled_from([errno.ENOSPC, errno.EIO, errno.EPERM]), st.text(max_size=50)
    ),
    pages_replies(),
    st.builds(
        p.StatsReply,
        ids,
        st.lists(
            st.tuples(st.text(min_size=1, max_size=10), st.integers(0, 2**64 - 1)), max_size=5
        ).map(tuple),
    ),
    st.builds(lambda rid, held: p.Held(rid, sorted(held),
                                       [g for g, _ in (held[s] for s in sorted(held))],
                                       [n for _, n in (held[s] for s in sorted(held))]),
              ids, st.dictionaries(st.integers(0, 2**40 - 1),
                                   st.tuples(st.integers(0, 2**64 - 1), payload_lengths),
                                   max_size=6)),
)  # fmt: skip


def handshaken() -> tuple[Connection, Connection]:
    """A client and a server past Hello and Welcome: batches' layout from now on."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(client.send(p.Hello(0, p.PROTOCOL_VERSION, "a", "")))
    assert isinstance(server.next_event(), p.Hello)
    client.receive_data(server.send(p.Welcome(0, p.PROTOCOL_VERSION, 0, 1 << 20)))
    assert isinstance(client.next_event(), p.Welcome)
    assert client.handshaken and server.handshaken
    return client, server


def server_past_hello() -> Connection:
    return handshaken()[1]


def frame_of(message: p.Message) -> bytes:
    return p.encode(message)


@given(requests)
def test_every_request_round_trips_through_both_sides(message: p.Request) -> None:
    client, server = handshaken()
    server.receive_data(client.send(message))
    assert server.next_event() == message
    assert server.next_event() is NEED_DATA
    assert server.in_flight == 1 and client.in_flight == 1


@given(replies)
def test_every_reply_round_trips(message: p.Reply) -> None:
    frame = p.encode(message)
    assert p.decode(memoryview(frame)[4:]) == message


@given(st.one_of(requests, replies))
def test_a_frame_in_parts_is_the_same_bytes_as_the_frame(message: p.Message) -> None:
    parts = encode_parts(message)
    assert b"".join(parts) == p.encode(message)
    if isinstance(message, (p.SwapOut, p.Pages)):
        assert any(part is message.data for part in parts)  # the pages: their own buffer


@given(st.integers(1, p.MAX_BATCH_PAGES), st.integers(0, 2**32 - 1), st.integers(1, 3))
def test_a_swap_out_from_page_buffers_is_the_same_frame(n: int, seed: int, cut: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(n * PAGE_SIZE)
    slots = rng.sample(range(p.MAX_SLOTS), n) if seed % 2 else range(seed, seed + n)
    tags = array("I", [rng.getrandbits(32) for _ in slots])
    gens = array("Q", [rng.randint(1, 2**64 - 1) for _ in slots])
    message = p.SwapOut(seed, slots, data, tags, gens)
    views = [memoryview(data)[i : i + PAGE_SIZE] for i in range(0, len(data), PAGE_SIZE)]
    client, _ = handshaken()
    parts = client.send_swap_out(seed, message.runs, gens, tags, None, views)
    assert b"".join(parts) == p.encode(message)
    assert len(b"".join(parts)) == 4 + 8 + 8 + 8 * len(message.runs) + 12 * n + n * PAGE_SIZE
    # A payload a little short is a payload: the frame then says every length.
    short = [*views[:-1], views[-1][:-cut]]
    parts = handshaken()[0].send_swap_out(seed, message.runs, gens, tags, None, short)
    lengths = [PAGE_SIZE] * (n - 1) + [PAGE_SIZE - cut]
    sized = p.SwapOut(seed, slots, data[:-cut], tags, gens, None, lengths)
    assert sized.sized and b"".join(parts) == p.encode(sized)
    for wrong in ([*views[:-1], b""], [*views[:-1], bytes(PAGE_SIZE + cut)], views[:-1]):
        with pytest.raises(p.LocalProtocolError):  # empty, over a page, one missing
            handshaken()[0].send_swap_out(seed, message.runs, gens, tags, None, wrong)


@given(st.lists(payload_lengths, min_size=1, max_size=p.MAX_BATCH_PAGES), st.booleans())
def test_payloads_of_any_length_travel_with_their_lengths(lengths: list[int], sealed: bool) -> None:
    n = len(lengths)
    data = random.Random(n).randbytes(sum(lengths))
    views, at = [], 0
    for length in lengths:
        views.append(memoryview(data)[at : at + length])
        at += length
    seals = bytes(range(16)) * n if sealed else None
    tags, gens = array("I", range(n)), array("Q", range(1, n + 1))
    client, server = handshaken()
    for part in client.send_swap_out(5, (range(100, 100 + n),), gens, tags, seals, views):
        server.receive_data(part)
    got = server.next_event()
    assert isinstance(got, p.SwapOut) and list(got.lengths) == lengths
    assert got.sized == (lengths != [PAGE_SIZE] * n) and bytes(got.data) == data
    assert [bytes(got.data[a:b]) for a, b in itertools.pairwise(got.offsets())] == [
        bytes(v) for v in views
    ]
    reply = p.Pages(5, data, tags, gens, seals, lengths)
    for part in server.send_parts(reply):
        client.receive_data(part)
    back = client.next_event()
    assert back == reply and isinstance(back, p.Pages)
    assert [bytes(back.payload(i)) for i in range(n)] == [bytes(v) for v in views]


def test_a_batch_of_whole_pages_carries_no_lengths() -> None:
    whole = p.SwapOut(1, range(4), bytes(4 * PAGE_SIZE), range(4), [1] * 4)
    same = p.SwapOut(1, range(4), bytes(4 * PAGE_SIZE), range(4), [1] * 4, None, [PAGE_SIZE] * 4)
    assert not whole.sized and not same.sized and p.encode(whole) == p.encode(same)
    assert list(whole.lengths) == [PAGE_SIZE] * 4 and whole.sized_lengths is None
    reply = p.Pages(1, bytes(2 * PAGE_SIZE), (1, 2), (1, 1))
    assert len(p.encode(reply)) == 4 + 8 + 2 * 12 + 2 * PAGE_SIZE  # no lengths
    assert list(reply.offsets()) == [0, PAGE_SIZE, 2 * PAGE_SIZE]
    sized = p.Pages(1, bytes(PAGE_SIZE + 8), (1, 2), (1, 1), None, [PAGE_SIZE, 8])
    assert len(p.encode(sized)) == 4 + 8 + 2 * 14 + PAGE_SIZE + 8
    assert bytes(sized.payload(1)) == bytes(8) and list(sized.offsets()) == [0, 4096, 4104]
    held = p.Held(1, [3, 9], [1, 2], [PAGE_SIZE, 768])
    assert len(p.encode(held)) == 4 + 8 + 2 * 18
    assert p.decode(memoryview(p.encode(held))[4:]) == held
    assert list(p.Held(1, [3], [1]).lengths) == [PAGE_SIZE]


@pytest.mark.parametrize("bad", [0, PAGE_SIZE + 1, 0xFFFF])
def test_a_payload_of_length_zero_or_over_a_page_on_the_wire_is_a_remote_error(bad: int) -> None:
    """The lengths are the peer's: a frame whose lengths add up to its size but say a
    payload of 0 or more than a page is refused before anything is kept."""
    lengths = [bad, PAGE_SIZE] if bad else [0, PAGE_SIZE]
    data = bytes(sum(lengths))
    good = p.SwapOut(1, [3, 4], bytes(16), [1, 2], [1, 1], None, [8, 8])
    frame = bytearray(p.encode(good))
    at = 4 + 8 + 8 + 8 + 2 * 12  # length, head, runs' count, one run, gens and tags
    assert struct.unpack_from("<HH", frame, at) == (8, 8)
    struct.pack_into("<HH", frame, at, *lengths)
    frame = frame[: at + 4] + data
    frame[:4] = struct.pack(">I", len(frame) - 4)
    conn = server_past_hello()
    conn.receive_data(bytes(frame))
    with pytest.raises(RemoteProtocolError, match=r"a payload is 1\.\.4096 bytes"):
        conn.next_event()
    pages = bytearray(p.encode(p.Pages(1, bytes(16), [1, 2], [1, 1], None, [8, 8])))
    struct.pack_into("<HH", pages, 4 + 8 + 24, *lengths)
    pages = pages[: 4 + 8 + 24 + 4] + data
    pages[:4] = struct.pack(">I", len(pages) - 4)
    client, _ = handshaken()
    client.send(p.SwapIn(1, [3, 5]))
    client.receive_data(bytes(pages))
    with pytest.raises(RemoteProtocolError, match=r"a payload is 1\.\.4096 bytes"):
        client.next_event()


def test_lengths_that_disagree_with_the_frame_are_a_remote_error() -> None:
    frame = bytearray(p.encode(p.SwapOut(1, [3], bytes(100), [1], [1], None, [100])))
    at = 4 + 8 + 8 + 8 + 12
    struct.pack_into("<H", frame, at, 101)  # one byte more than the frame carries
    conn = server_past_hello()
    conn.receive_data(bytes(frame))
    with pytest.raises(RemoteProtocolError, match="head says"):
        conn.next_event()
    cut = p.encode(p.SwapOut(1, range(200), bytes(200 * 8), range(200), [1] * 200, None,
                             [8] * 200))  # fmt: skip
    short = bytearray(cut[: 4 + 8 + 8 + 8 + 12 * 200 + 100])  # the lengths cut off
    short[:4] = struct.pack(">I", len(short) - 4)
    conn = server_past_hello()
    conn.receive_data(bytes(short))
    with pytest.raises(RemoteProtocolError, match="without their lengths"):
        conn.next_event()


def test_slots_travel_as_runs_of_consecutive_slots() -> None:
    one = p.encode(p.SwapIn(1, [7, 8, 9, 10]))
    four = p.encode(p.SwapIn(1, [7, 9, 8, 10]))  # no two consecutive: four runs of one
    assert len(one) == 4 + 8 + 8 + 8  # length, head, how many runs, one run
    assert len(four) == 4 + 8 + 8 + 4 * 8
    decoded = p.decode(memoryview(one)[4:])
    assert isinstance(decoded, p.SwapIn) and decoded.runs == (range(7, 11),)
    assert p.runs_of([1, 2, 3, 9, 10, 5]) == (range(1, 4), range(9, 11), range(5, 6))


def test_a_server_sends_a_batch_in_parts_the_client_reads_as_one() -> None:
    client, server = handshaken()
    server.receive_data(client.send(p.SwapIn(7, (1, 2, 3, 4))))
    server.next_event()
    reply = p.Pages(7, bytes(range(256)) * 64, range(4), [5, 6, 7, 8])
    for part in server.send_parts(reply):
        client.receive_data(part)
    assert client.next_event() == reply and client.in_flight == 0


def test_a_batch_is_read_straight_into_the_connections_buffer() -> None:
    _, server = handshaken()
    message = p.SwapOut(3, range(10, 14), bytes(range(256)) * 64, [1, 2, 3, 4], [9, 9, 9, 9])
    frame = p.encode(message)
    at = 0
    while at < len(frame):  # what recv_into / BufferedProtocol do
        room = server.get_buffer()
        take = min(len(room), len(frame) - at, 1000)
        room[:take] = frame[at : at + take]
        server.buffer_updated(take)
        at += take
    event = server.next_event()
    assert event == message
    assert isinstance(event, p.SwapOut) and isinstance(event.data, memoryview)  # no copy


@given(requests, st.integers(1, 97))
def test_byte_by_byte_and_chunked_feeding_give_the_same_message(
    message: p.Request, chunk: int
) -> None:
    frame = p.encode(message)
    server = server_past_hello()
    events = []
    for i in range(0, len(frame), chunk):
        server.receive_data(frame[i : i + chunk])
        while (event := server.next_event()) is not NEED_DATA:
            events.append(event)
    assert events == [message]


def _drain(conn: Connection) -> list[object]:
    out: list[object] = []
    while True:
        try:
            event = conn.next_event()
        except RemoteProtocolError:
            out.append(RemoteProtocolError)
            return out
        if event is NEED_DATA or event is CLOSED:
            return out
        out.append(event)


@settings(max_examples=300)
@given(st.binary(max_size=2000), st.booleans(), st.booleans())
def test_arbitrary_bytes_yield_only_messages_or_remote_protocol_error(
    junk: bytes, byte_by_byte: bool, past_hello: bool
) -> None:
    def fresh() -> Connection:
        return server_past_hello() if past_hello else Connection(Role.SERVER)

    conn = fresh()
    chunks = [junk[i : i + 1] for i in range(len(junk))] if byte_by_byte else [junk] * bool(junk)
    seen: list[object] = []
    for piece in chunks:
        conn.receive_data(piece)
        seen += _drain(conn)
        if RemoteProtocolError in seen:
            break
    conn2 = fresh()
    conn2.receive_data(junk)
    conn2.receive_data(b"")
    seen += _drain(conn2)
    assert all(isinstance(e, p.Request) or e is RemoteProtocolError for e in seen)


@given(requests, st.binary(min_size=1, max_size=64))
def test_a_valid_frame_followed_by_junk_yields_the_message_then_at_most_an_error(
    message: p.Request, junk: bytes
) -> None:
    conn = server_past_hello()
    conn.receive_data(p.encode(message) + junk)
    conn.receive_data(b"")
    events = _drain(conn)
    assert events[0] == message
    assert events[1:] in ([], [RemoteProtocolError])


def test_oversized_length_is_rejected_before_any_payload_arrives() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(struct.pack(">I", p.MAX_FRAME_SIZE + 1))
    with pytest.raises(RemoteProtocolError, match="frame length"):
        conn.next_event()
    with pytest.raises(RemoteProtocolError):  # the connection stays dead
        conn.next_event()


def test_eof_inside_a_frame_is_a_remote_error_and_clean_eof_is_closed() -> None:
    frame = p.encode(p.Flush(1))
    conn = server_past_hello()
    conn.receive_data(frame[:-1])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        conn.next_event()
    clean = server_past_hello()
    clean.receive_data(frame)
    clean.receive_data(b"")
    assert clean.next_event() == p.Flush(1)
    assert clean.next_event() is CLOSED


@pytest.mark.parametrize(
    "build",
    [
        lambda: p.SwapOut(1, (1, 2), bytes(PAGE_SIZE), (0, 0), (1, 1)),  # data too short
        lambda: p.SwapOut(1, (1, 1), bytes(2 * PAGE_SIZE), (0, 0), (1, 1)),  # duplicate slot
        lambda: p.SwapOut(1, (), b"", (), ()),  # empty batch
        lambda: p.SwapOut(1, (1, 2), bytes(2 * PAGE_SIZE), (0, 0), (1,)),  # one generation
        lambda: p.SwapOut(1, (1, 2), bytes(2 * PAGE_SIZE), (0, 0), (1, 0)),  # 0: unwritten
        lambda: p.SwapOut(1, (1,), bytes(PAGE_SIZE), (0,), (1,), bytes(15)),  # a seal short
        lambda: p.SwapIn(1, tuple(range(p.MAX_BATCH_PAGES + 1))),  # batch too big
        lambda: p.SwapIn(1, (p.MAX_SLOTS,)),
        lambda: p.SwapIn(2**32, (1,)),  # request id overflows uint32
        lambda: p.Hello(1, 1, "../etc", ""),  # area names are identifiers
        lambda: p.Hello(1, 1, "a" * 65, ""),
        lambda: p.Swapfile(1, 1, 10, PAGE_SIZE),  # type: ignore[arg-type]  # int is not bool
        lambda: p.Swapfile(1, True, 10, 4000),
        lambda: p.Discard(1, ((5, 0),)),
        lambda: p.Failed(1, 0, "no errno"),
        lambda: p.Inventory(1, 0, p.MAX_INVENTORY_SLOTS + 1),
        lambda: p.Held(1, [1, 2], [1]),
        lambda: p.Held(1, [1, 2], [1, 1], [PAGE_SIZE]),  # a length short
        lambda: p.Held(1, [1], [1], [0]),  # a held payload is never empty
        lambda: p.Held(1, [1], [1], [PAGE_SIZE + 1]),
        lambda: p.SwapOut(1, (1,), bytes(9), (0,), (1,), None, (8,)),  # lengths say 8
        lambda: p.SwapOut(1, (1, 2), bytes(9), (0, 0), (1, 1), None, (9, 0)),  # empty
        lambda: p.SwapOut(1, (1,), bytes(5000), (0,), (1,), None, (5000,)),  # over a page
        lambda: p.SwapOut(1, (1,), bytes(8), (0,), (1,), None, (8, 8)),  # one length more
        lambda: p.SwapOut(1, (1,), bytes(8), (0,), (1,), None, (1 << 16,)),  # not a u16
        lambda: p.Pages(1, bytes(10), (0,), (1,), None, (11,)),
        lambda: p.Fence(1, -1),
        lambda: p.Fence(1, 2**64),
        lambda: p.Swapfile(1, True, 10, PAGE_SIZE, 2**64),  # area_id is a u64
        lambda: p.Swapfile(1, True, 10, PAGE_SIZE, 1, "x" * (p.MAX_HOLDER + 1)),
        lambda: p.Swapfile(1, True, 10, PAGE_SIZE, 1, "host\nForged log line"),
        lambda: p.Swapfile(1, True, 10, PAGE_SIZE, 1, "h", 1),  # type: ignore[arg-type]
        lambda: p.Welcome(1, 4, 0, 0, clean=1),  # type: ignore[arg-type]
        lambda: p.Welcome(1, 4, 0, 0, floor=-1),
        lambda: p.Welcome(1, 4, 0, 0, holder="\x1b[31m"),
    ],
)
def test_invalid_messages_cannot_be_built(build: object) -> None:
    with pytest.raises((LocalProtocolError, OverflowError)):
        build()  # type: ignore[operator]


def test_roles_and_request_ids_are_enforced() -> None:
    client, server = handshaken()
    with pytest.raises(LocalProtocolError):
        client.send(p.Ok(1))  # clients do not send replies
    with pytest.raises(LocalProtocolError):
        server.send(p.Ok(1))  # nothing to reply to
    server.receive_data(client.send(p.Flush(7)) + client.send(p.Stats(8)))
    assert [server.next_event(), server.next_event()] == [p.Flush(7), p.Stats(8)]
    # replies may come out of order
    client.receive_data(server.send(p.Ok(8)) + server.send(p.Ok(7)))
    assert [client.next_event(), client.next_event()] == [p.Ok(8), p.Ok(7)]
    with pytest.raises(LocalProtocolError):
        client.send(p.Flush(9)) and client.send(p.Flush(9))
    # a reply nobody asked for is the store's fault
    rogue, _ = handshaken()
    rogue.receive_data(p.encode(p.Ok(42)))
    with pytest.raises(RemoteProtocolError, match="unknown request"):
        rogue.next_event()


def test_a_duplicate_request_id_in_flight_is_a_remote_error() -> None:
    server = server_past_hello()
    server.receive_data(p.encode(p.Flush(3)) * 2)
    assert server.next_event() == p.Flush(3)
    with pytest.raises(RemoteProtocolError, match="already in flight"):
        server.next_event()


def test_only_a_hello_may_open_a_connection_and_nothing_but_its_answer_before_welcome() -> None:
    conn = Connection(Role.SERVER)
    conn.receive_data(p.encode(p.Flush(3)))  # a batch-layout frame before any Hello
    with pytest.raises(RemoteProtocolError):
        conn.next_event()
    client = Connection(Role.CLIENT)
    with pytest.raises(LocalProtocolError):
        client.send(p.Flush(1))  # nothing but a Hello before the Welcome


@pytest.mark.parametrize("old", [2, 3])
def test_an_older_peer_and_this_one_understand_each_others_hello(old: int) -> None:
    """Protocols 2 and 3 framed the handshake [TYPE, request_id, fields...] in msgpack;
    4 still does, so an old agent reads the new store's refusal, and the other way
    round."""
    import msgpack

    old_hello = msgpack.packb([1, 5, old, "host", ""])
    server = Connection(Role.SERVER)
    server.receive_data(struct.pack(">I", len(old_hello)) + old_hello)
    hello = server.next_event()
    assert hello == p.Hello(5, old, "host", "")
    refusal = server.send(p.Failed(5, errno.EPROTONOSUPPORT, "protocol 3, store 4"))
    assert msgpack.unpackb(refusal[4:]) == [65, 5, errno.EPROTONOSUPPORT, "protocol 3, store 4"]
    # An old store's refusal, as it sends it, reaches this client as a Failed.
    client = Connection(Role.CLIENT)
    client.send(p.Hello(5, p.PROTOCOL_VERSION, "host"))
    old_refusal = msgpack.packb([65, 5, errno.EPROTONOSUPPORT, "protocol 4; store speaks 3"])
    client.receive_data(struct.pack(">I", len(old_refusal)) + old_refusal)
    assert client.next_event() == p.Failed(5, errno.EPROTONOSUPPORT, "protocol 4; store speaks 3")


def test_a_welcome_of_another_version_is_an_error_that_says_so() -> None:
    """A Welcome in protocol 3's shape is never read as protocol 4's with fields
    missing: the client says which protocol the store answered in."""
    import msgpack

    this = p.PROTOCOL_VERSION
    old = "answered in protocol 3; this client speaks protocol"
    for body, match in (([66, 5, 3, 16, 16], f"{old} {this}"),
                        ([66, 5, this, 16, 16], "Welcome with 4 fields")):  # fmt: skip
        client = Connection(Role.CLIENT)
        client.send(p.Hello(5, p.PROTOCOL_VERSION, "host"))
        packed = msgpack.packb(body)
        client.receive_data(struct.pack(">I", len(packed)) + packed)
        with pytest.raises(RemoteProtocolError, match=match):
            client.next_event()


def test_a_later_protocols_longer_hello_is_read_for_its_version() -> None:
    import msgpack

    later = msgpack.packb([1, 5, p.PROTOCOL_VERSION + 1, "host", "", "more", 7])
    server = Connection(Role.SERVER)
    server.receive_data(struct.pack(">I", len(later)) + later)
    assert server.next_event() == p.Hello(5, p.PROTOCOL_VERSION + 1, "host", "")


@given(ids, u64, u64, u64, st.booleans(), u64, holders, u64)
def test_the_welcome_round_trips_with_what_it_says_of_the_store_and_the_area(
    rid: int, store_id: int, boot: int, prev: int, clean: bool, area_id: int, holder: str,
    floor: int,
) -> None:  # fmt: skip
    welcome = p.Welcome(rid, p.PROTOCOL_VERSION, 5, 6, store_id, boot, prev, clean, area_id,
                        holder, floor)  # fmt: skip
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    server.receive_data(client.send(p.Hello(rid, p.PROTOCOL_VERSION, "a")))
    server.next_event()
    client.receive_data(server.send(welcome))
    assert client.next_event() == welcome


def test_well_formed_msgpack_with_the_wrong_shape_is_a_remote_error() -> None:
    import msgpack

    this = p.PROTOCOL_VERSION
    for body in ([3, 1, [1], b"x", [0]], [99, 1], {"a": 1}, [1, 1, this, "area", "t", "extra"]):
        packed = msgpack.packb(body)
        conn = Connection(Role.SERVER)
        conn.receive_data(struct.pack(">I", len(packed)) + packed)
        with pytest.raises(RemoteProtocolError):
            conn.next_event()


def test_a_batch_whose_head_disagrees_with_its_length_is_a_remote_error() -> None:
    frame = bytearray(p.encode(p.SwapOut(1, [3, 5], bytes(2 * PAGE_SIZE), [1, 2], [1, 1])))
    frame[6:8] = struct.pack("<H", 3)  # says three pages, carries two
    conn = server_past_hello()
    conn.receive_data(bytes(frame))
    with pytest.raises(RemoteProtocolError, match="head says"):
        conn.next_event()


def test_sized_tags_cover_each_payload_as_stored() -> None:
    seed = p.area_seed("swap0")
    data = bytes(range(256)) * 16 + b"12345678" + bytes(range(200))
    tags = p.tags_of_sized(data, [PAGE_SIZE, 8, 200], seed, (1, 2, 3), (5, 6, 7))
    assert list(tags) == [
        p.page_tag(data[:PAGE_SIZE], seed, 1, 5),
        p.page_tag(b"12345678", seed, 2, 6),
        p.page_tag(bytes(range(200)), seed, 3, 7),
    ]
    whole = bytes(range(256)) * 32
    assert p.tags_of_sized(whole, [PAGE_SIZE] * 2, seed, (4, 9), (1, 2)) == p.tags_of(
        whole, seed, (4, 9), (1, 2)
    )
    # The same word at another slot, or a payload one byte longer: another tag.
    assert p.page_tag(b"12345678", seed, 3, 6) != tags[1]
    assert p.page_tag(b"12345678\0", seed, 2, 6) != tags[1]


def test_tags_are_crc32_bound_to_area_slot_and_generation() -> None:
    import zlib

    data = bytes(range(256)) * 32
    first, second = data[:PAGE_SIZE], data[PAGE_SIZE:]
    seed = p.area_seed("swap0")
    tags = p.tags_of(data, seed, (5, 9), (1, 7 << 32 | 3))
    assert list(tags) == [p.page_tag(first, seed, 5, 1), p.page_tag(second, seed, 9, 7 << 32 | 3)]
    assert tags[0] == zlib.crc32(first, p.slot_seed(seed, 5, 1))
    # The same bytes elsewhere, or written before, or in another area, or another epoch.
    others = {
        p.page_tag(first, seed, 6, 1),
        p.page_tag(first, seed, 5, 2),
        p.page_tag(first, p.area_seed("swap1"), 5, 1),
        p.page_tag(first, seed, 5, 1 << 32 | 1),
        zlib.crc32(first),
    }
    assert tags[0] not in others and len(others) == 5
    assert zlib.crc32(bytes(4096)) == p.ZERO_PAGE_CRC
