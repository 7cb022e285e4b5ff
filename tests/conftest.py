"""Shared fixtures: real page-store servers on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from netswap.lab.ports import free_port, wait_port
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


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 15
) -> None:
    """wait_port for a child process: it must still run while we wait."""
    wait_port(port, (lambda: proc.poll() is None) if proc is not None else lambda: True, timeout)


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


def pytest_configure(config: pytest.Config) -> None:
    """Compiled modules built from older sources would shadow the .py files under test:
    rebuild them first (a no-op when up to date; deploy/compile.py), once, on the
    controller -- xdist's workers start after it."""
    if hasattr(config, "workerinput") or not list((REPO / "protocol").glob("*.so")):
        return
    subprocess.run([sys.executable, str(REPO / "deploy" / "compile.py")], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


# The longest groups first, so that make test's two workers start on them at once:
# the swapping guests (~15 min in all) on one; the compose lab (~4 min) and then
# the short guests (~4 min) on the other, which then takes the rest.
FIRST_GROUPS = ("vm", "compose", "vm-short")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        mark = item.get_closest_marker("xdist_group")
        group = mark.args[0] if mark and mark.args else None
        return FIRST_GROUPS.index(group) if group in FIRST_GROUPS else len(FIRST_GROUPS)

    items.sort(key=rank)  # stable: each group keeps its own order
