"""The compose lab for real: `netswap lab compose` on this host's podman, offline.

One run proves what issue #15 asks, each claim as a line of its output: the
load's verified workload through the containers, Prometheus scraping every
target with a rising page counter, a store killed -9 mid-load with no client
error and re-replication done, the file store restarted with its pages, every
page verified by the load's final check, and nothing left after `down`. The
refusals (a missing tool, a port in use) are one line each, nothing started.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from .nbdserver import NETSWAP

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
# One worker runs them in turn (make test's -n 2): they share port 9090 and podman.
pytestmark = pytest.mark.xdist_group("compose")


def lab_compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NETSWAP, "lab", "compose", *args], capture_output=True, text=True,
                          timeout=1500, env=env)  # fmt: skip


@pytest.mark.timeout(1600)
def test_the_compose_lab_runs_a_store_kill_and_a_restart_without_losing_a_page() -> None:
    result = lab_compose("--seconds", "50", "--peer-seconds", "6")
    out = result.stdout
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "lab-compose.txt").write_text(out + result.stderr[-5000:])
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert re.search(r"first verified page \d+s after start", out)
    rising = re.search(r"4 of 4 netswap targets up; sum\(netswap_swap_out_pages_total\) "
                       r"(\d+) -> (\d+), rising", out)  # fmt: skip
    assert rising and int(rising.group(2)) > int(rising.group(1)), out
    assert re.search(r"store1 killed -9: .* re-replication onto the other stores done in", out)
    kept = re.search(r"restarted after a flush: \d+ arena pages in use before the flush, "
                     r"(\d+) as it came back from its index; the agent found its pages kept",
                     out)  # fmt: skip
    assert kept and int(kept.group(1)) > 0, out
    assert "store3 alone now serves every page" in out
    final = re.search(r"final check: (\d+) pages written, every one verified; 0 client errors",
                      out)  # fmt: skip
    assert final and int(final.group(1)) > 0, out
    assert "down: 0 containers, 0 volumes, 0 networks left" in out
    assert re.search(r"through `lab up` processes: [\d.]+x", out)


def test_a_missing_tool_is_one_line(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"  # everything on PATH but podman
    bin_dir.mkdir()
    for tool in ("runc", "debootstrap", "docker-compose", "nbdkit", "python3"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env = dict(os.environ, PATH=str(bin_dir))
    result = lab_compose(env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip() == (
        "netswap lab: error: lab compose needs podman (apt-get install podman)"
    ), result.stderr
    assert "Traceback" not in result.stderr


def test_prometheus_port_in_use_is_one_line_and_starts_nothing() -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", 9090))
        except OSError:
            pytest.fail("port 9090 is taken before the test: another lab is up")
        s.listen()
        result = lab_compose()
    assert result.returncode == 2
    assert "port 127.0.0.1:9090 (the lab's Prometheus) is in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
