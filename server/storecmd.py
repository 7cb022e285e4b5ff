"""`netswap store`: run one page-store server in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from netswap.protocol import PAGE_SIZE

from .app import StoreServer, serve_until_signal
from .backends import BACKENDS, open_backend
from .guard import Limits
from .heap import tune_heap
from .service import Tokens
from .tls import server_context
from .units import (
    UsageError,
    format_size,
    is_loopback,
    parse_hostport,
    parse_size,
    read_secret,
)

DEFAULT_LISTEN = "127.0.0.1:7177"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"address to listen on (default {DEFAULT_LISTEN})",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="memory")
    parser.add_argument("--capacity", default="1G", help="bytes this store holds (4G): whole "
                        "pages, and shorter payloads in size classes")  # fmt: skip
    parser.add_argument("--path", help="directory for the file backend")
    parser.add_argument(
        "--area-quota",
        help="bytes one area may hold (default: the whole capacity), so that one host "
        "cannot fill a store others share; past it its writes get ENOSPC",
    )
    parser.add_argument("--token-file", help="tokens: 'TOKEN' or 'AREA TOKEN' per line")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=Limits.max_connections,
        help=f"connections served at once; more are refused (default {Limits.max_connections}, "
        "under the usual 1024 open files: raise `ulimit -n` with it)",
    )
    parser.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate")
    parser.add_argument("--tls-key", metavar="FILE", help="the certificate's private key")
    parser.add_argument("--tls-client-ca", metavar="FILE",
                        help="require client certificates from this CA (mutual TLS)")  # fmt: skip
    parser.add_argument(
        "--http",
        metavar="HOST:PORT",
        help="ops endpoint: /metrics, /api/stats and the dashboard (default off)",
    )
    parser.add_argument(
        "--http-token-file",
        metavar="FILE",
        help="bearer token the ops endpoint requires (needed off loopback)",
    )


def run(args: argparse.Namespace) -> int:
    try:
        host, port = parse_hostport(args.listen, 7177)
        capacity = parse_size(args.capacity)
        http = parse_hostport(args.http, 0) if args.http else None
        quota = parse_size(args.area_quota) if args.area_quota else 0
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if capacity < PAGE_SIZE or capacity % PAGE_SIZE:
        raise UsageError(f"--capacity must be a positive multiple of {PAGE_SIZE}")
    if args.max_connections < 1:
        raise UsageError("--max-connections must be at least 1")
    limits = Limits(max_connections=args.max_connections)
    tokens = Tokens.from_file(args.token_file) if args.token_file else Tokens.open()
    try:
        http_token = read_secret(args.http_token_file) if args.http_token_file else ""
    except OSError as exc:
        raise UsageError(f"--http-token-file: {exc.strerror}: {args.http_token_file}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if http is not None and not is_loopback(http[0]) and not http_token:
        raise UsageError(f"--http on {http[0]} needs --http-token-file (only loopback may be "
                         "open)")  # fmt: skip
    tls = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        if not (args.tls_cert and args.tls_key):
            raise UsageError("TLS needs both --tls-cert and --tls-key")
        try:
            tls = server_context(args.tls_cert, args.tls_key, args.tls_client_ca)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    if not is_loopback(host) and not tokens.required:
        raise UsageError(f"listening on {host} needs --token-file (only loopback may be open)")
    try:
        backend = open_backend(args.backend, capacity // PAGE_SIZE, args.path)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    backend.area_quota = quota

    def ready(store: StoreServer) -> None:
        logging.getLogger("netswap.store").info(
            "page store (%s, %s%s) listening on %s:%d: store %016x, boot %016x%s",
            args.backend,
            format_size(capacity),
            ", TLS" if tls else "",
            host,
            store.port,
            backend.store_id,
            backend.boot,
            _before(backend.prev_boot, backend.clean),
        )
        print(f"netswap store ready on {host}:{store.port}", file=sys.stderr, flush=True)

    tune_heap()  # batch buffers reused from the heap (heap.py: 95k -> 170k+ pages/s)
    runner = _runner(fast=tls is None)  # server/tls.py: why TLS stays on asyncio
    with runner:
        runner.run(serve_until_signal(backend, host, port, tokens, ready, http, limits, http_token,
                                      tls))  # fmt: skip
    return 0


def _before(prev_boot: int, clean: bool) -> str:
    if not prev_boot:
        return ""
    return f" (after boot {prev_boot:016x}, which ended {'clean' if clean else 'unclean'})"


def _runner(fast: bool = True) -> asyncio.Runner:
    """An asyncio.Runner on uvloop when it is installed (and `fast`)."""
    if not fast:
        return asyncio.Runner()
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)
