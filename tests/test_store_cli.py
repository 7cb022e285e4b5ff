"""`netswap store` as a user runs it: a real process, signals, clear errors."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
from pathlib import Path

from netswap.client.rpc import StoreClient
from netswap.protocol import PAGE_SIZE

from .conftest import free_port, wait_for_port


def start(cmd: list[str], *args: str) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    proc = subprocess.Popen(
        [*cmd, "store", "--listen", f"127.0.0.1:{port}", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wait_for_port(port, proc)
    return port, proc


def stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=15)
    return proc.returncode, err.decode()


def test_file_store_survives_sigterm_and_restart(netswap_cmd: list[str], tmp_path: Path) -> None:
    args = ("--backend", "file", "--path", str(tmp_path / "pages"), "--capacity", "16M")
    port, proc = start(netswap_cmd, *args)
    data = bytes(range(256)) * 32

    async def write() -> None:
        client = await StoreClient.connect("127.0.0.1", port, "host1")
        await client.swapfile(True, 1024)
        await client.swap_out([10, 11], data)
        await client.flush()
        await client.close()

    asyncio.run(write())
    status, err = stop(proc)
    assert status == 0, err
    assert "Traceback" not in err

    port, proc = start(netswap_cmd, *args)

    async def read() -> bytes:
        client = await StoreClient.connect("127.0.0.1", port, "host1")
        got = await client.swap_in([11, 10, 12], b"\1\1\0")  # 12: never written
        await client.close()
        return got

    try:
        assert asyncio.run(read()) == data[PAGE_SIZE:] + data[:PAGE_SIZE] + bytes(PAGE_SIZE)
    finally:
        stop(proc)


def run_cli(cmd: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30)


def test_bad_options_are_one_line_errors(netswap_cmd: list[str]) -> None:
    cases = [
        (("store", "--capacity", "12x"), "bad size"),
        (("store", "--capacity", "1000"), "multiple of 4096"),
        (("store", "--listen", "0.0.0.0:7177"), "needs --token-file"),
        (("store", "--backend", "file"), "needs a path"),
        (("store", "--listen", "127.0.0.1:99999"), "port out of range"),
    ]
    for args, message in cases:
        result = run_cli(netswap_cmd, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error(netswap_cmd: list[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(netswap_cmd, "store", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert "address already in use" in result.stderr.lower()
    assert "Traceback" not in result.stderr
