"""Running a page store: listen, serve until a signal, shut down in stages.

Stage 1 on SIGTERM/SIGINT: stop accepting. Stage 2: close every connection
gracefully (in-flight replies are already written; transports flush them).
Stage 3: flush the backend so a file store is durable, mark it clean (DIR/clean
names this boot: the next process's Welcome says `clean`), then close it. A
second signal while shutting down exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from .backends import PageBackend
from .guard import Limits
from .service import StoreService, Tokens
from .tls import TlsAcceptor
from .transport import StoreProtocol

log = logging.getLogger("netswap.store")

SHUTDOWN_GRACE_S = 5.0


@dataclass
class StoreServer:
    service: StoreService
    server: asyncio.Server
    connections: set[StoreProtocol]

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self.server.close()
        for conn in list(self.connections):
            conn.shutdown()
        pending = [c.closed for c in list(self.connections)]
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*pending), SHUTDOWN_GRACE_S)
        await self.server.wait_closed()
        backend = self.service.backend
        backend.flush()  # a failed flush raises: no clean mark
        try:
            backend.mark_clean()
        except OSError as exc:  # the next start then says not clean: the safe side
            log.warning("could not mark the store clean: %s", exc)
        backend.close()


async def start_store(
    backend: PageBackend,
    host: str,
    port: int,
    tokens: Tokens | None = None,
    limits: Limits | None = None,
    tls: ssl.SSLContext | None = None,
) -> StoreServer:
    service = StoreService(backend, tokens or Tokens.open(), limits)
    connections: set[StoreProtocol] = set()
    loop = asyncio.get_running_loop()

    def plain() -> asyncio.BaseProtocol:
        return StoreProtocol(service, connections)

    factory: Callable[[], asyncio.BaseProtocol] = plain
    if tls is not None:  # the handshake first, then the same protocol over TLS
        factory = lambda: TlsAcceptor(tls, plain)  # noqa: E731
    server = await loop.create_server(factory, host, port, reuse_address=True)
    return StoreServer(service, server, connections)


async def serve_until_signal(
    backend: PageBackend,
    host: str,
    port: int,
    tokens: Tokens,
    on_ready: Callable[[StoreServer], None] | None = None,
    http: tuple[str, int] | None = None,
    limits: Limits | None = None,
    http_token: str = "",
    tls: ssl.SSLContext | None = None,
) -> None:
    store = await start_store(backend, host, port, tokens, limits, tls)
    ops = None
    if http is not None:
        from .ops.http import start_http
        from .ops.sources import store_source

        try:
            ops = await start_http(store_source(store.service), *http, http_token)
        except BaseException:
            await store.close()
            raise
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            os._exit(1)
        log.info("%s: shutting down", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    if on_ready is not None:
        on_ready(store)
    await stop.wait()
    if ops is not None:
        await ops.close()
    await store.close()
