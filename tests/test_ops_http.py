"""The ops endpoint's own HTTP server, in process on real loopback sockets: each
bound (head size, head deadline, connections) and each refusal is a status, never
a hang or a traceback; the routes answer what test_ops.py reads end to end."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from netswap.server.backends import MemoryBackend
from netswap.server.ops import http
from netswap.server.ops.metrics import render
from netswap.server.ops.snapshot import Histogram
from netswap.server.ops.sources import backend_source


async def exchange(port: int, raw: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, return all the server sends before it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


@pytest.fixture
async def ops() -> AsyncIterator[http.OpsServer]:
    server = await http.start_http(backend_source(MemoryBackend(16)), "127.0.0.1", 0, "s3cret")
    yield server
    await server.close()


def port_of(server: http.OpsServer) -> int:
    return int(server._server.sockets[0].getsockname()[1])


async def test_routes_answer_with_the_token_and_refuse_without(ops: http.OpsServer) -> None:
    port = port_of(ops)
    auth = b"Authorization: Bearer s3cret\r\n"
    stats = await exchange(port, b"GET /api/stats HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n")
    assert status(stats) == 200 and b"Connection: close" in stats
    assert json.loads(stats.split(b"\r\n\r\n", 1)[1])["role"] == "embedded"
    metrics = await exchange(port, b"GET /metrics HTTP/1.1\r\n" + auth + b"\r\n")
    assert status(metrics) == 200 and b"netswap_" in metrics
    page = await exchange(port, b"GET /?token=s3cret HTTP/1.1\r\n\r\n")
    assert status(page) == 200 and b"<canvas" in page
    refused = await exchange(port, b"GET /api/stats HTTP/1.1\r\n\r\n")
    assert status(refused) == 401 and b"WWW-Authenticate: Bearer" in refused
    wrong = await exchange(port, b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer s3cre\r\n\r\n")
    assert status(wrong) == 401
    assert status(await exchange(port, b"GET /nope HTTP/1.1\r\n" + auth + b"\r\n")) == 404
    assert status(await exchange(port, b"POST / HTTP/1.1\r\n" + auth + b"\r\n")) == 405


@pytest.mark.parametrize(
    "raw", [b"GARBAGE\r\n\r\n", b"GET / SPDY/3\r\n\r\n", b"GET / HTTP/1.1\r\nno-colon\r\n\r\n"]
)
async def test_a_malformed_head_is_400(ops: http.OpsServer, raw: bytes) -> None:
    assert status(await exchange(port_of(ops), raw)) == 400


async def test_a_head_over_the_bound_is_431_before_it_ends(ops: http.OpsServer) -> None:
    endless = b"GET / HTTP/1.1\r\nX-Fill: " + b"a" * (http.MAX_HEAD + 10)
    assert status(await exchange(port_of(ops), endless)) == 431


async def test_a_silent_peer_gets_408_at_the_head_deadline(
    monkeypatch: pytest.MonkeyPatch, ops: http.OpsServer
) -> None:
    monkeypatch.setattr(http, "HEAD_DEADLINE_S", 0.2)
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert status(await exchange(port_of(ops), b"GET / HT")) == 408
    assert loop.time() - began < 5


async def test_connections_past_the_bound_are_closed_at_once(
    monkeypatch: pytest.MonkeyPatch, ops: http.OpsServer
) -> None:
    monkeypatch.setattr(http, "MAX_CONNECTIONS", 3)
    port = port_of(ops)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
    writer.close()
    for _, w in held:
        w.close()
    await asyncio.sleep(0.05)  # they leave: a new one is served again
    reply = await exchange(port, b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n\r\n")
    assert status(reply) == 200


def test_the_exposition_parses_with_prometheus_clients_own_parser() -> None:
    """/metrics is written by hand (metrics.py); the reference parser must agree."""
    from prometheus_client.parser import text_string_to_metric_families

    snap = replace(
        backend_source(MemoryBackend(16))(),
        histograms={
            "rpc_duration_seconds": [Histogram("swap_out", [("0.001", 3), ("+Inf", 6)], 0.25, 6)]
        },
        decisions={'odd "reason"\\n': 4},
    )
    families = {f.name: f for f in text_string_to_metric_families(render(snap).decode())}
    hist = families["netswap_rpc_duration_seconds"]
    assert hist.type == "histogram"
    assert [(s.name, s.labels.get("le"), s.value) for s in hist.samples] == [
        ("netswap_rpc_duration_seconds_bucket", "0.001", 3.0),
        ("netswap_rpc_duration_seconds_bucket", "+Inf", 6.0),
        ("netswap_rpc_duration_seconds_count", None, 6.0),
        ("netswap_rpc_duration_seconds_sum", None, 0.25),
    ]
    decisions = families["netswap_batch_decisions"]
    assert decisions.type == "counter"
    assert [(s.labels, s.value) for s in decisions.samples] == [({"reason": 'odd "reason"\\n'}, 4)]
    assert families["netswap_build_info"].samples[0].labels["role"] == "embedded"
    assert families["netswap_host_memory_available_bytes"].samples[0].value > 0


async def test_a_slow_answer_leaves_the_loop_turning(
    monkeypatch: pytest.MonkeyPatch, ops: http.OpsServer
) -> None:
    """A tracemalloc snapshot takes seconds: on the agent's loop it timed batches out
    (#29 §6). It runs on a thread of its own, and the loop keeps its pace meanwhile."""

    def snapshot() -> http.Response:
        time.sleep(1.0)  # a snapshot's work, holding its thread (not the GIL)
        return 200, "application/json", b'{"sites": []}'

    monkeypatch.setattr(http, "allocations", snapshot)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    auth = b"Authorization: Bearer s3cret\r\n"
    reply = await exchange(port_of(ops), b"GET /debug/allocations HTTP/1.1\r\n" + auth + b"\r\n")
    ticker.cancel()
    assert status(reply) == 200 and reply.endswith(b'{"sites": []}')
    assert ticks >= 50, f"the loop turned {ticks} times in the snapshot's second"


async def test_memory_names_the_allocators_figures(ops: http.OpsServer) -> None:
    auth = b"Authorization: Bearer s3cret\r\n"
    reply = await exchange(port_of(ops), b"GET /debug/memory HTTP/1.1\r\n" + auth + b"\r\n")
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert body["malloc"]["system"] > 0 and body["malloc"]["arenas"]
    assert body["allocated_blocks"] > 0
    assert body["pymalloc"]["arenas_allocated_current"] > 0  # not tracing: pymalloc answers


async def test_trim_gives_back_what_malloc_held_free(ops: http.OpsServer) -> None:
    held = [bytearray(100_000) for _ in range(300)]  # below the mmap threshold: the heap's
    del held[::2]  # holes no trim at the heap's top reaches: 15 MB free inside it
    auth = b"Authorization: Bearer s3cret\r\n"
    reply = await exchange(port_of(ops), b"GET /debug/memory?trim=1 HTTP/1.1\r\n" + auth + b"\r\n")
    trimmed = json.loads(reply.split(b"\r\n\r\n", 1)[1])["trim"]
    assert trimmed["rss_after_kib"] < trimmed["rss_before_kib"] - 5_000, trimmed
    assert len(held) == 150
