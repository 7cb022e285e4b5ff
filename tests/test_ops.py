"""Ops: /metrics, /api/stats, `netswap stats`, the Grafana dashboard's queries."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from netswap.client.rpc import StoreClient
from netswap.server.ops.recorder import Recorder

from .conftest import free_port
from .nbdserver import NETSWAP, connect, netswap_serve
from .procs import StoreProc, agent_serve, stores, wait_until

GRAFANA = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "netswap-dashboard.json"
PAGE = 4096


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = (
        rf"^{re.escape(name)}{re.escape(labels)}\s+(\S+)$"
        if labels
        else rf"^{name}(?:{{[^}}]*}})?\s+(\S+)$"
    )
    found = re.findall(pattern, text, re.M)
    assert found, f"{name}{labels} not in /metrics"
    return sum(float(v) for v in found)


def test_recorder_buckets_and_recent_quantiles() -> None:
    rec = Recorder((1.0, 2.0, 5.0))
    for v in (0.5, 1.5, 1.7, 3.0, 9.0):
        rec.observe(v)
    assert rec.cumulative() == [("1.0", 1), ("2.0", 3), ("5.0", 4), ("+Inf", 5)]
    assert rec.count == 5 and rec.sum == pytest.approx(15.7)
    assert rec.recent_quantile(0.5) == 1.7 and rec.recent_quantile(0.99) == 9.0
    assert Recorder((1.0,)).recent_quantile(0.5) is None


def test_store_metrics_move_when_pages_move() -> None:
    http = free_port()
    store = StoreProc("64M", ("--http", f"127.0.0.1:{http}")).start()
    try:
        before = get(f"http://127.0.0.1:{http}/metrics")
        assert metric(before, "netswap_swap_out_pages_total") == 0

        async def traffic() -> None:
            client = await StoreClient.connect("127.0.0.1", store.port, "m")
            await client.swapfile(True, 100)
            await client.swap_out(list(range(10)), bytes(10 * PAGE))
            await client.swap_in([1, 2, 3])
            await client.close()

        asyncio.run(traffic())
        after = get(f"http://127.0.0.1:{http}/metrics")
        assert metric(after, "netswap_swap_out_pages_total") == 10
        assert metric(after, "netswap_swap_in_pages_total") == 3
        assert metric(after, "netswap_rpc_duration_seconds_count", '{op="swap_out"}') == 1
        assert metric(after, "netswap_batch_pages_sum", '{op="swap_out"}') == 10
        assert metric(after, "netswap_store_used_bytes") == 10 * PAGE
        assert metric(after, "netswap_store_pages") == 10
        assert metric(after, "netswap_store_payload_bytes") == 10 * PAGE
        assert 'netswap_build_info{role="store",version="0.1.0"} 1.0' in after
        stats = json.loads(get(f"http://127.0.0.1:{http}/api/stats"))
        assert stats["role"] == "store" and stats["swap_out_pages_total"] == 10
        assert "<canvas" in get(f"http://127.0.0.1:{http}/")

        async def payloads() -> None:  # sixteen 256-B payloads: one page more, in bytes
            client = await StoreClient.connect("127.0.0.1", store.port, "m")
            await client.swap_out(list(range(20, 36)), [bytes(256)] * 16)
            await client.close()

        asyncio.run(payloads())
        more = get(f"http://127.0.0.1:{http}/metrics")
        assert metric(more, "netswap_store_used_bytes") == 11 * PAGE
        assert metric(more, "netswap_store_pages") == 26
        assert metric(more, "netswap_store_payload_bytes") == 10 * PAGE + 16 * 256
    finally:
        store.kill()


def test_agent_metrics_follow_nbd_traffic_and_store_health() -> None:
    http = free_port()
    with (
        stores(2) as (s1, s2),
        agent_serve([s1, s2], "16M", "--http", f"127.0.0.1:{http}") as (
            uri,
            _,
        ),
    ):
        url = f"http://127.0.0.1:{http}"
        h = connect(uri)
        # Pages of their own: a same-filled one is read back without a store (payload.py).
        h.pwrite(os.urandom(32 * PAGE), 0)  # the loop places the slab: the first write's
        h.pwrite(os.urandom(8 * PAGE), 0)  # a lone write to a placed slab: direct
        h.pread(8 * PAGE, 0)
        text = get(url + "/metrics")
        assert metric(text, "netswap_swap_out_pages_total") == 40
        assert metric(text, "netswap_swap_in_pages_total") == 8
        # reads=direct (the default): nbdkit's thread asked a store itself
        assert metric(text, "netswap_swap_in_pages_by_path_total", '{path="direct"}') == 8
        assert metric(text, "netswap_swap_in_pages_by_path_total", '{path="loop"}') == 0
        # writes=direct: the second went to both replicas from nbdkit's thread
        assert metric(text, "netswap_swap_out_pages_by_path_total", '{path="direct"}') == 8
        assert metric(text, "netswap_swap_out_pages_by_path_total", '{path="loop"}') == 32
        assert metric(text, "netswap_store_up") == 2
        assert metric(text, "netswap_reserve_bytes") == 16 << 20
        assert metric(text, "netswap_rpc_duration_seconds_count", '{op="swap_out"}') >= 2
        s2.kill()
        h.pwrite(b"n" * PAGE, 0)

        def one_down() -> bool:
            return metric(get(url + "/metrics"), "netswap_store_up") == 1

        wait_until(one_down, 10, "store_up to drop")
        text = get(url + "/metrics")
        assert metric(text, "netswap_store_failures_total", f'{{store="{s2.address}"}}') == 1
        assert metric(text, "netswap_store_failures_total", f'{{store="{s1.address}"}}') == 0
        assert metric(text, "netswap_store_reconnects_total") == 0
        stats = json.loads(get(url + "/api/stats"))
        assert [st["up"] for st in stats["stores"]].count(False) == 1
        assert stats["replication_lag_pages"] > 0
        assert sum(stats["decisions"].values()) > 0
        s2.start()  # same port: the agent reconnects

        def reconnected() -> bool:
            text = get(url + "/metrics")
            return metric(text, "netswap_store_reconnects_total", f'{{store="{s2.address}"}}') == 1

        wait_until(reconnected, 15, "the reconnect to be counted")
        assert metric(get(url + "/metrics"), "netswap_store_up") == 2
        h.shutdown()


def test_embedded_export_serves_metrics_too() -> None:
    http = free_port()
    with netswap_serve("--size", "8M", "--http", f"127.0.0.1:{http}") as uri:
        h = connect(uri)
        h.pwrite(b"e" * (4 * PAGE), 0)
        text = get(f"http://127.0.0.1:{http}/metrics")
        assert metric(text, "netswap_swap_out_pages_total") == 4
        assert 'role="embedded"' in text
        h.shutdown()


def test_every_metric_the_grafana_dashboard_queries_exists() -> None:
    queried: set[str] = set()
    for panel in json.loads(GRAFANA.read_text())["panels"]:
        for target in panel["targets"]:
            queried.update(re.findall(r"netswap_[a-z0-9_]+", target["expr"]))
    exposed: set[str] = set()
    http_store, http_agent = free_port(), free_port()
    store = StoreProc("64M", ("--http", f"127.0.0.1:{http_store}")).start()
    try:
        with agent_serve([store], "8M", "--http", f"127.0.0.1:{http_agent}"):
            for port in (http_store, http_agent):
                text = get(f"http://127.0.0.1:{port}/metrics")
                exposed.update(re.findall(r"^(netswap_[a-z0-9_]+)", text, re.M))
    finally:
        store.kill()
    missing = sorted(queried - exposed)
    assert not missing, missing
    assert len(queried) >= 12


def test_netswap_stats_prints_the_figures_and_fails_clearly() -> None:
    http = free_port()
    store = StoreProc("64M", ("--http", f"127.0.0.1:{http}")).start()
    try:
        out = subprocess.run([NETSWAP, "stats", f"http://127.0.0.1:{http}/"], capture_output=True,
                             text=True, timeout=30)  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert "netswap store" in out.stdout and "this store" in out.stdout
        watch = subprocess.run(
            [NETSWAP, "stats", f"http://127.0.0.1:{http}/", "--watch", "--count", "2"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert watch.returncode == 0 and "pages out / in" in watch.stdout
    finally:
        store.kill()
    start = time.monotonic()
    dead = subprocess.run([NETSWAP, "stats", f"http://127.0.0.1:{free_port()}/"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert dead.returncode == 2 and "cannot read" in dead.stderr
    assert "Traceback" not in dead.stderr and time.monotonic() - start < 15


def test_an_ops_endpoint_off_loopback_needs_a_bearer_token(tmp_path: Path) -> None:
    # Refused before anything listens (so no test binds an address beyond loopback).
    bare = subprocess.run([NETSWAP, "store", "--listen", f"127.0.0.1:{free_port()}",
                           "--http", f"0.0.0.0:{free_port()}"],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert bare.returncode == 2 and "needs --http-token-file" in bare.stderr
    assert "Traceback" not in bare.stderr
    plugin = subprocess.run([NETSWAP, "serve", "--dry-run", "--size", "64M",
                             "--http", f"0.0.0.0:{free_port()}"],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert plugin.returncode == 2 and "needs http-token-file" in plugin.stderr
    token = tmp_path / "ops-token"
    token.write_text("t0ken\n")
    http = free_port()
    store = StoreProc("64M", ("--http", f"127.0.0.1:{http}", "--http-token-file", str(token)))
    store.start()
    try:
        url = f"http://127.0.0.1:{http}"
        for path in ("/api/stats", "/metrics", "/", "/?token=wrong"):
            with pytest.raises(urllib.error.HTTPError) as info:
                get(url + path)
            assert info.value.code == 401
            info.value.close()  # the error holds the response's socket
        request = urllib.request.Request(url + "/api/stats")
        request.add_header("Authorization", "Bearer t0ken")
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.load(response)["role"] == "store"
        assert "<canvas" in get(url + "/?token=t0ken")  # the dashboard, given it once
        denied = subprocess.run([NETSWAP, "stats", url], capture_output=True, text=True,
                                timeout=30)  # fmt: skip
        assert denied.returncode == 2 and "Unauthorized" in denied.stderr
        shown = subprocess.run([NETSWAP, "stats", url, "--token-file", str(token)],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        assert shown.returncode == 0 and "netswap store" in shown.stdout
    finally:
        store.kill()


def test_reads_and_writes_loop_send_everything_through_the_agents_loop() -> None:
    http = free_port()
    with (
        stores(1) as (s1,),
        agent_serve(
            [s1], "16M", "--http", f"127.0.0.1:{http}", "--reads", "loop", "--writes", "loop"
        ) as (uri, _),  # fmt: skip
    ):
        h = connect(uri)
        sent = os.urandom(16 * PAGE)  # not same-filled: those are read without a store
        h.pwrite(sent, 0)
        assert h.pread(16 * PAGE, 0) == sent
        text = get(f"http://127.0.0.1:{http}/metrics")
        assert metric(text, "netswap_swap_in_pages_by_path_total", '{path="loop"}') == 16
        assert metric(text, "netswap_swap_in_pages_by_path_total", '{path="direct"}') == 0
        assert metric(text, "netswap_swap_out_pages_by_path_total", '{path="loop"}') == 16
        assert metric(text, "netswap_swap_out_pages_by_path_total", '{path="direct"}') == 0
        h.shutdown()


def test_the_agent_says_what_its_pages_became_on_the_wire() -> None:
    """#31: pages out by payload kind (same-filled, compressed, whole) and their bytes."""
    http = free_port()
    with stores(1) as procs, agent_serve(procs, "16M", "--http", f"127.0.0.1:{http}") as (uri, _):
        h = connect(uri)
        h.pwrite(bytes(4 * PAGE), 0)  # zero pages: filled
        h.pwrite((b"netswap page text " * 1000)[: 2 * PAGE], 4 * PAGE)  # compressible
        h.pwrite(os.urandom(3 * PAGE), 8 * PAGE)  # incompressible: whole
        text = get(f"http://127.0.0.1:{http}/metrics")
        kinds = {k: metric(text, "netswap_swap_out_pages_by_kind_total", f'{{kind="{k}"}}')
                 for k in ("filled", "compressed", "whole")}  # fmt: skip
        assert kinds == {"filled": 4, "compressed": 2, "whole": 3}
        sent = metric(text, "netswap_swap_out_payload_bytes_total")
        assert 4 * 8 + 2 * 256 + 3 * PAGE <= sent <= 4 * 8 + 2 * 3072 + 3 * PAGE
        out = subprocess.run([NETSWAP, "stats", f"http://127.0.0.1:{http}/"],
                             capture_output=True, text=True, timeout=30,
                             env={**os.environ, "COLUMNS": "160"})  # fmt: skip
        assert "4 / 2 / 3" in out.stdout, out.stdout
        h.shutdown()
