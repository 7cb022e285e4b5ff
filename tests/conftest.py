"""Shared fixtures: real page-store servers on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from netswap.server.app import StoreServer, start_store
from netswap.server.backends import MemoryBackend
from netswap.server.service import Tokens

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture
async def store() -> AsyncIterator[StoreServer]:
    server = await start_store(MemoryBackend(4096), "127.0.0.1", 0)
    yield server
    await server.close()


@pytest.fixture
async def small_store() -> AsyncIterator[StoreServer]:
    server = await start_store(MemoryBackend(64), "127.0.0.1", 0)
    yield server
    await server.close()


@pytest.fixture
async def token_store(tmp_path: Path) -> AsyncIterator[StoreServer]:
    tokens = tmp_path / "tokens"
    tokens.write_text("alpha s3cret-a\nbeta s3cret-b\n")
    server = await start_store(MemoryBackend(1024), "127.0.0.1", 0, Tokens.from_file(tokens))
    yield server
    await server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture
def netswap_cmd() -> list[str]:
    return [str(BIN / "netswap")]


@pytest.fixture
def store_process(netswap_cmd: list[str]) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(
        [*netswap_cmd, "store", "--listen", f"127.0.0.1:{port}", "--capacity", "64M"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for_port(port, proc)
        yield port, proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
