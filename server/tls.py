"""TLS for the store RPC: stdlib `ssl` contexts, and the handshake as its own step.

Store connections cross real networks; with `--tls-cert/--tls-key` a store
speaks TLS (1.2 at least), and with `--tls-client-ca` it also requires each
client's certificate (mutual TLS). The agent verifies the store against
`--store-tls-ca`.

The store does the handshake itself (`loop.start_tls` from a small acceptor)
rather than handing an SSL context to `create_server`, so that a failed
handshake -- a plaintext client, an unknown CA, an expired certificate -- is
one rate-limited line naming the peer and the reason, not a silent close
(both asyncio and uvloop only debug-log those). A TLS store runs on asyncio's
own loop: uvloop's server-side start_tls loses the ClientHello and hangs
(MagicStack/uvloop#707; seen here too), and TLS costs more than the loop.

On the swap path TLS costs memory that plaintext does not: OpenSSL allocates
record buffers per connection and may allocate on a send, and the kernel's
nbd driver protects only its own socket. As the nbd-client man page says of
TLS under swap, the deadlock that mlock and PF_MEMALLOC keep away can come
back; the agent's reserve and mlock cover its own buffers, not OpenSSL's.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import cast

from netswap.protocol import MAX_FRAME_SIZE

from .guard import RateLimitedLog

log = logging.getLogger("netswap.store")
warn = RateLimitedLog(log)
# One handshake: two round trips and a certificate check; 5 s as for a Hello.
HANDSHAKE_S = 5.0
# What a peer may send before the store's protocol takes over: a Hello frame (1 KiB),
# and a pipelined request or two of an eager client.
EARLY_BYTES = 4 * MAX_FRAME_SIZE
# OpenSSL's reasons when the other side speaks no TLS at all.
_PLAINTEXT = ("HTTP_REQUEST", "WRONG_VERSION_NUMBER", "UNEXPECTED_EOF_WHILE_READING")


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """The store's context; ValueError naming the file when one cannot be used."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(lambda: ctx.load_cert_chain(cert, key), f"--tls-cert {cert} / --tls-key {key}")
    if client_ca:
        _load(lambda: ctx.load_verify_locations(client_ca), f"--tls-client-ca {client_ca}")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(ca: str, cert: str = "", key: str = "") -> ssl.SSLContext:
    """The agent's context: verify the store against `ca`; present `cert` if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(lambda: ctx.load_verify_locations(ca), f"store-tls-ca {ca}")
    if cert:
        _load(lambda: ctx.load_cert_chain(cert, key or None), f"tls-cert {cert}")
    return ctx


def _load(action: Callable[[], None], what: str) -> None:
    try:
        action()
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        if not Path(what.split()[1]).exists():
            reason = "no such file"
        raise ValueError(f"{what}: {reason}") from None


class TlsAcceptor(asyncio.Protocol):
    """Accepts TCP, does the server side of the handshake, then hands the TLS
    transport to the real protocol and forwards its events to it."""

    def __init__(self, ctx: ssl.SSLContext, inner: Callable[[], asyncio.BaseProtocol]) -> None:
        self._ctx, self._inner_factory = ctx, inner
        self._inner: asyncio.Protocol | None = None
        self._early = bytearray()
        self._tcp: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)
        self._tcp = tcp
        tcp.pause_reading()  # the ClientHello waits for start_tls (which resumes reading)
        self._task = asyncio.get_running_loop().create_task(self._handshake(tcp))

    async def _handshake(self, tcp: asyncio.Transport) -> None:
        peer = tcp.get_extra_info("peername")
        name = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            tls = await asyncio.get_running_loop().start_tls(
                tcp, self, self._ctx, server_side=True, ssl_handshake_timeout=HANDSHAKE_S
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            warn.warning(
                "tls", "closing %s: TLS handshake failed: %s", name, handshake_failure(exc)
            )
            tcp.abort()
            return
        if tls is None:
            return
        self._inner = cast(asyncio.Protocol, self._inner_factory())  # data_received: both kinds
        self._inner.connection_made(tls)
        if self._early:  # what the peer sent between the handshake and this line
            early, self._early = bytes(self._early), bytearray()
            self._inner.data_received(early)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)
            return
        # Decrypted data can arrive before the handshake's awaiter resumes; keep it
        # for the store's protocol (a client sends one Hello and waits for Welcome).
        self._early += data
        if len(self._early) > EARLY_BYTES and self._tcp is not None:
            warn.warning("tls", "closing a peer: %d bytes before its handshake ended",
                         len(self._early))  # fmt: skip
            self._early.clear()
            self._tcp.abort()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._inner.connection_lost(exc)


def handshake_failure(exc: BaseException) -> str:
    """The part of a failed TLS handshake a person can act on (either side)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not accepted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        plain = exc.reason in (
            "HTTP_REQUEST",
            "WRONG_VERSION_NUMBER",
            "UNEXPECTED_EOF_WHILE_READING",
        )
        hint = " (the other side speaks no TLS?)" if plain else ""
        return f"{exc.reason}{hint}"
    if isinstance(exc, TimeoutError) or "taking longer" in str(exc):
        return f"no handshake within {HANDSHAKE_S:.0f}s (the other side speaks no TLS?)"
    if isinstance(exc, ConnectionResetError):
        return "reset by the other side (it rejected this certificate, or speaks no TLS)"
    return str(exc) or type(exc).__name__
