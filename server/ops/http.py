"""The ops endpoint: /metrics (Prometheus), /api/stats (JSON), / (the dashboard).

A small HTTP/1.1 server, one `asyncio.Protocol` on the event loop that already
runs the role -- the store's loop, the agent's loop -- or, for an embedded
export (which has no loop), on a small thread of its own. Not aiohttp: in the
agent this runs inside nbdkit, whose every touched page is locked, and
aiohttp's import alone cost ~14 MiB of it. Three GET routes need no framework:
one request per connection (`Connection: close`), its head bounded in bytes
and time, the number of connections bounded. Every request builds one
snapshot; nothing here is on the swap path. Off unless --http is given. On any
address but loopback it needs a bearer token (--http-token-file): the figures
name hosts, areas and sizes. The dashboard takes it once as `/?token=...` and
sends it as a header from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
from collections.abc import Callable
from importlib import resources
from typing import cast
from urllib.parse import parse_qs, urlsplit

from . import heapstats
from .metrics import render
from .sources import Source

log = logging.getLogger("netswap.http")
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"
# A request's line and headers: a browser sends 1-2 KiB, Prometheus less; 8 KiB is
# the line limit aiohttp and nginx apply by default.
MAX_HEAD = 8192
# A peer has this long to send its request head (the store's own Hello deadline).
HEAD_DEADLINE_S = 5.0
# A dashboard, a scraper and `netswap stats --watch` are a handful of connections;
# 64 leave room for several watchers while one peer can hold at most 64 x 8 KiB.
MAX_CONNECTIONS = 64
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout",
           431: "Request Header Fields Too Large", 500: "Internal Server Error"}  # fmt: skip

Response = tuple[int, str, bytes]
# A route whose answer takes long (a tracemalloc snapshot: seconds with many traces) is
# answered by a function run on a thread of its own, so that the loop it would hold --
# the agent's, with batches whose deadlines run meanwhile -- keeps turning (#29 §6: a
# snapshot on the loop timed batches out and marked stores down).
Slow = Callable[[], Response]


def dashboard_html() -> bytes:
    return resources.files("netswap.server.ops").joinpath("dashboard.html").read_bytes()


class Routes:
    """What each path answers; the token check comes first."""

    def __init__(self, source: Source, token: str) -> None:
        self.source, self.token, self.page = source, token, dashboard_html()

    def answer(self, method: str, target: str, headers: dict[str, str]) -> Response | Slow:
        if method != "GET":
            return 405, "text/plain", b"only GET\n"
        url = urlsplit(target)
        if self.token and not self._allowed(headers, url.query):
            return 401, "text/plain", b"bearer token required\n"
        if url.path == "/metrics":
            return 200, CONTENT_TYPE_METRICS, render(self.source())
        if url.path == "/api/stats":
            return 200, "application/json", json.dumps(self.source().to_json()).encode()
        if url.path == "/":
            return 200, "text/html; charset=utf-8", self.page
        if url.path == "/debug/allocations":  # seconds of work: answered off the loop
            return allocations
        if url.path == "/debug/memory":  # the allocators' figures: cheap (heapstats.py)
            body = heapstats.memory()
            if parse_qs(url.query).get("trim") == ["1"]:  # once, at a soak's end
                body["trim"] = heapstats.trim()
            return 200, "application/json", json.dumps(body).encode()
        return 404, "text/plain", b"not found\n"

    def _allowed(self, headers: dict[str, str], query: str) -> bool:
        given = headers.get("authorization", "").removeprefix("Bearer ")
        given = given or parse_qs(query).get("token", [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())


# Allocation sites /debug/allocations lists, largest first: enough to name a leak.
ALLOCATION_SITES = 200


def allocations() -> Response:
    """Where this process's Python memory lives, by source line (tracemalloc): only
    while it traces (NETSWAP_TRACEMALLOC=FRAMES at start), for the soak's diffs."""
    import tracemalloc

    if not tracemalloc.is_tracing():
        return 404, "text/plain", b"not tracing: start with NETSWAP_TRACEMALLOC=FRAMES\n"
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )
    stats = snapshot.statistics("lineno")
    sites = [{"where": f"{s.traceback[0].filename}:{s.traceback[0].lineno}", "bytes": s.size,
              "blocks": s.count} for s in stats[:ALLOCATION_SITES]]  # fmt: skip
    traced, peak = tracemalloc.get_traced_memory()
    body = {"traced_bytes": traced, "peak_bytes": peak, "sites": sites}
    return 200, "application/json", json.dumps(body).encode()


# Slow answers run one at a time: at most MAX_CONNECTIONS threads wait on it, each
# holding nothing but its request.
SLOW_ONE_AT_A_TIME = threading.Lock()


class OpsProtocol(asyncio.Protocol):
    """One connection: read a bounded head, answer it, close."""

    def __init__(self, routes: Routes, connections: set[OpsProtocol]) -> None:
        self._routes, self._connections = routes, connections
        self._transport: asyncio.Transport | None = None
        self._head = bytearray()
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport = transport
        if len(self._connections) >= MAX_CONNECTIONS:
            transport.abort()
            return
        self._connections.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(HEAD_DEADLINE_S, self._reply, 408, "text/plain", b"")

    def data_received(self, data: bytes) -> None:
        if self._timer is None:  # answered already: anything more is ignored
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end > MAX_HEAD or (end < 0 and len(self._head) > MAX_HEAD):
            self._reply(431, "text/plain", b"request head over 8 KiB\n")
        elif end >= 0:
            answer = self._answer(bytes(self._head[:end]))
            if callable(answer):
                self._off_loop(answer)
            else:
                self._reply(*answer)

    def _off_loop(self, slow: Slow) -> None:
        """Answer on a thread of its own; one at a time (a second waits its turn: a
        snapshot's copy of the traces is as large as the traced memory)."""
        if self._timer is not None:  # the head is in: its deadline no longer applies
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()

        def run() -> None:
            with SLOW_ONE_AT_A_TIME:
                try:
                    answer = slow()
                except Exception:
                    log.exception("ops endpoint: a slow answer failed")
                    answer = 500, "text/plain", b"internal error\n"
            with contextlib.suppress(RuntimeError):  # the loop closed: no one to answer
                loop.call_soon_threadsafe(self._send, *answer)

        threading.Thread(target=run, name="netswap-http-slow", daemon=True).start()

    def _answer(self, head: bytes) -> Response | Slow:
        try:
            line, *fields = head.decode("latin-1").split("\r\n")
            method, target, version = line.split(" ")
            if not version.startswith("HTTP/1."):
                raise ValueError(version)
            headers = {}
            for f in fields:
                name, value = f.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        except ValueError:
            return 400, "text/plain", b"malformed request\n"
        try:
            return self._routes.answer(method, target, headers)
        except Exception:  # a snapshot that fails is the server's fault, not the peer's
            log.exception("ops endpoint: %s failed", target[:100])
            return 500, "text/plain", b"internal error\n"

    def _reply(self, status: int, kind: str, body: bytes) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._send(status, kind, body)

    def _send(self, status: int, kind: str, body: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        extra = "WWW-Authenticate: Bearer\r\n" if status == 401 else ""
        head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n{extra}"
                "Connection: close\r\n\r\n")  # fmt: skip
        transport.write(head.encode() + body)
        transport.close()  # after the buffered reply is written

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None


class OpsServer:
    """A listening ops endpoint; `close()` stops it and its connections."""

    def __init__(self, server: asyncio.Server, connections: set[OpsProtocol]) -> None:
        self._server, self._connections = server, connections

    async def close(self) -> None:
        self._server.close()
        for conn in list(self._connections):
            conn.abort()
        await self._server.wait_closed()


async def start_http(source: Source, host: str, port: int, token: str = "") -> OpsServer:
    routes = Routes(source, token)
    connections: set[OpsProtocol] = set()
    factory: Callable[[], OpsProtocol] = lambda: OpsProtocol(routes, connections)  # noqa: E731
    server = await asyncio.get_running_loop().create_server(factory, host, port,
                                                            reuse_address=True)  # fmt: skip
    log.info("ops endpoint on http://%s:%d/", host, port)
    return OpsServer(server, connections)


class HttpThread:
    """An ops endpoint on a thread of its own (embedded exports have no loop)."""

    def __init__(self, source: Source, host: str, port: int, token: str = "") -> None:
        self.source, self.host, self.port, self.token = source, host, port, token
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="netswap-http", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        try:
            ops = loop.run_until_complete(start_http(self.source, self.host, self.port, self.token))
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(ops.close())
            loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
