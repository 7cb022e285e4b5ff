"""The dashboard in a real browser: Debian's chromium, driven by Playwright.

Against a real `netswap serve --backend remote --http` and two real stores
under a small NBD load: the charts receive data, the store table lists both
stores, and a store killed with SIGKILL turns red within a few seconds. A
screenshot is kept in artifacts/ as the test's artefact.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from .conftest import free_port
from .nbdserver import connect
from .procs import agent_serve, stores

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def load(uri: str, stop: threading.Event) -> None:
    h = connect(uri)
    i = 0
    while not stop.is_set():
        h.pwrite(bytes([i % 251]) * 4096 * 8, (i % 256) * 4096 * 8)
        h.pread(4096 * 8, ((i * 7) % 256) * 4096 * 8)
        i += 1
    h.shutdown()


@pytest.mark.timeout(180)
def test_dashboard_charts_fill_and_a_killed_store_turns_red() -> None:
    from playwright.sync_api import expect, sync_playwright

    assert Path(CHROMIUM).exists(), "chromium is not installed (apt-get install chromium)"
    ARTIFACTS.mkdir(exist_ok=True)
    http = free_port()
    with (
        stores(2) as (s1, s2),
        agent_serve([s1, s2], "16M", "--http", f"127.0.0.1:{http}") as (
            uri,
            _,
        ),
    ):
        stop = threading.Event()
        worker = threading.Thread(target=load, args=(uri, stop))
        worker.start()
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"http://127.0.0.1:{http}/")
                expect(page.locator("#status")).to_have_text("live", timeout=10_000)
                page.wait_for_function("window.netswap.samples >= 4", timeout=15_000)
                points = int(page.locator("#chart-pages").get_attribute("data-points") or 0)
                assert points >= 4
                assert page.locator('.empty[data-for="chart-pages"]').is_hidden()
                assert page.locator('.empty[data-for="chart-latency"]').is_hidden()
                rows = page.locator("#stores tr")
                expect(rows).to_have_count(2)
                expect(page.locator('#stores tr[data-up="1"]')).to_have_count(2)
                s2.kill()
                red = page.locator(f'#stores tr.down[data-store="{s2.address}"]')
                expect(red).to_have_count(1, timeout=8_000)
                color = red.locator("td").first.evaluate("e => getComputedStyle(e).color")
                assert color == "rgb(255, 92, 92)"
                page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
                browser.close()
        finally:
            stop.set()
            worker.join(30)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
