"""The ops endpoint: /metrics (Prometheus), /api/stats (JSON), / (the dashboard).

aiohttp on the event loop that already runs the role -- the store's loop, the
agent's loop -- or, for an embedded export (which has no loop), on a small
thread of its own. Every request builds one snapshot; nothing here is on the
swap path. Off unless --http is given. On any address but loopback it needs a
bearer token (--http-token-file): the figures name hosts, areas and sizes. The
dashboard takes it once as `/?token=...` and sends it as a header from then on.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web

from .metrics import render
from .sources import Source

log = logging.getLogger("netswap.http")
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def dashboard_html() -> bytes:
    return resources.files("netswap.server.ops").joinpath("dashboard.html").read_bytes()


def _allowed(request: web.Request, token: str) -> bool:
    given = request.headers.get("Authorization", "").removeprefix("Bearer ")
    given = given or request.query.get("token", "")
    return hmac.compare_digest(given.encode(), token.encode())


def make_app(source: Source, token: str = "") -> web.Application:
    page = dashboard_html()

    @web.middleware
    async def bearer(request: web.Request, handler: Handler) -> web.StreamResponse:
        if token and not _allowed(request, token):
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=render(source()), headers={"Content-Type": CONTENT_TYPE_METRICS})

    async def stats(_: web.Request) -> web.Response:
        return web.Response(text=json.dumps(source().to_json()), content_type="application/json")

    async def index(_: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8")

    app = web.Application(middlewares=[bearer])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/stats", stats)
    app.router.add_get("/", index)
    return app


async def start_http(source: Source, host: str, port: int, token: str = "") -> web.AppRunner:
    runner = web.AppRunner(make_app(source, token), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    log.info("ops endpoint on http://%s:%d/", host, port)
    return runner


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
            runner = loop.run_until_complete(
                start_http(self.source, self.host, self.port, self.token)
            )
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
