"""TLS on the store RPC, with real store processes and real certificates.

A throwaway CA (the `cryptography` package Debian ships) signs the store's
certificate (IP 127.0.0.1) and a client's; a second CA and an expired
certificate make the failures. Each failure must be one clear line on each
side, and nothing may be written.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from netswap.client.rpc import ConnectionLost, StoreClient
from netswap.lab.ports import free_port
from netswap.protocol import PAGE_SIZE
from netswap.server.tls import client_context

from .nbdserver import NETSWAP, connect, netswap_serve
from .pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class Store:
    """A real store process; its log lines are kept for the 'one line each side' checks."""

    def __init__(self, tmp: Path, *tls: str) -> None:
        self.port, self.http = free_port(), free_port()
        self.log = tmp / f"store-{self.port}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [NETSWAP, "store", "--listen", f"127.0.0.1:{self.port}", "--capacity", "64M",
                 "--http", f"127.0.0.1:{self.http}", *tls],
                stdout=subprocess.DEVNULL, stderr=out,
            )  # fmt: skip
        # Wait for its "ready" line, not by probing the port: a probe is a TLS
        # handshake cut short, which the store reports (and rate-limits).
        deadline = time.monotonic() + 15
        while "ready" not in self.log.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)

    def lines(self, word: str, wait: float = 3.0) -> list[str]:
        """Log lines holding `word`, once there are any (the store may log after the
        client has already failed), or none after `wait` seconds."""
        deadline = time.monotonic() + wait
        while True:
            found = [x for x in self.log.read_text().splitlines() if word in x]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def pages_written(self) -> int:
        """From the ops endpoint: it needs no TLS, so it answers whatever the case."""
        url = f"http://127.0.0.1:{self.http}/api/stats"
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(json.load(response)["swap_out_pages_total"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def tls_args(pki: Pki, cert: Path | None = None, client_ca: bool = False) -> list[str]:
    out = ["--tls-cert", str(cert or pki.store_cert), "--tls-key", str(pki.store_key)]
    if cert == pki.expired_cert:
        out[3] = str(pki.store_key.with_name("expired.key"))
    return out + (["--tls-client-ca", str(pki.ca)] if client_ca else [])


async def round_trip(port: int, tls: object) -> None:
    client = await StoreClient.connect("127.0.0.1", port, "t", tls=tls)  # type: ignore[arg-type]
    await client.swapfile(True, 16)
    await client.swap_out([3], b"t" * PAGE_SIZE)
    assert await client.swap_in([3]) == b"t" * PAGE_SIZE
    stats = await client.stats()
    await client.close()
    assert stats["pages_written"] == 1


def test_pages_cross_tls_and_mutual_tls(pki: Pki, tmp_path: Path) -> None:
    store = Store(tmp_path, *tls_args(pki))
    mutual = Store(tmp_path, *tls_args(pki, client_ca=True))
    try:
        asyncio.run(round_trip(store.port, client_context(str(pki.ca))))
        with_cert = client_context(str(pki.ca), str(pki.client_cert), str(pki.client_key))
        asyncio.run(round_trip(mutual.port, with_cert))
        # Mutual TLS without a client certificate: refused, one line each side.
        with pytest.raises((ConnectionLost, OSError)):
            asyncio.run(round_trip(mutual.port, client_context(str(pki.ca))))
        assert len(mutual.lines("TLS handshake failed")) == 1
    finally:
        store.stop()
        mutual.stop()


@pytest.mark.parametrize(
    ("case", "client_says", "store_says"),
    [
        ("wrong CA", "certificate not accepted", "TLS handshake failed"),
        ("expired certificate", "expired", "TLS handshake failed"),
        ("plaintext client, TLS store", "a TLS store?", "speaks no TLS"),
        ("TLS client, plaintext store", "TLS with 127.0.0.1", "does this store need --tls-cert"),
    ],
)
def test_each_tls_mismatch_is_one_clear_line_and_writes_nothing(
    pki: Pki, tmp_path: Path, case: str, client_says: str, store_says: str
) -> None:
    store_tls = {"wrong CA": tls_args(pki), "expired certificate": tls_args(pki, pki.expired_cert),
                 "plaintext client, TLS store": tls_args(pki),
                 "TLS client, plaintext store": []}[case]  # fmt: skip
    ca = pki.other_ca if case == "wrong CA" else pki.ca
    tls = None if case.startswith("plaintext client") else client_context(str(ca))
    store = Store(tmp_path, *store_tls)
    try:
        with pytest.raises(ConnectionLost) as info:
            asyncio.run(round_trip(store.port, tls))
        assert client_says in str(info.value), str(info.value)
        assert "\n" not in str(info.value)
        said = store.lines(store_says)
        assert len(said) == 1, store.log.read_text()
        assert "Traceback" not in store.log.read_text()
        assert store.pages_written() == 0  # nothing was written
    finally:
        store.stop()


def test_the_agent_swaps_through_tls_stores(pki: Pki, tmp_path: Path) -> None:
    stores = [Store(tmp_path, *tls_args(pki, client_ca=True)) for _ in range(2)]
    try:
        args = ["--size", "64M", "--backend", "remote", "--replicas", "2",
                "--store-tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
                "--tls-key", str(pki.client_key)]  # fmt: skip
        for s in stores:
            args += ["--store", f"127.0.0.1:{s.port}"]
        with netswap_serve(*args) as uri:
            handle = connect(uri)
            data = bytes(range(256)) * 16 * 32  # 128 KiB
            handle.pwrite(data, 1 << 20)
            handle.flush()
            assert handle.pread(len(data), 1 << 20) == data
            handle.shutdown()
    finally:
        for s in stores:
            s.stop()
    bad = subprocess.run([NETSWAP, "serve", "--dry-run", "--size", "64M", "--backend", "remote",
                          "--store", "127.0.0.1:1", "--store-tls-ca", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert bad.returncode == 2 and "no such file" in bad.stderr and "Traceback" not in bad.stderr
