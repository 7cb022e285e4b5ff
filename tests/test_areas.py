"""One host per area (#30): a store names the host that holds an area, another host asking
for it is refused with that name and releases nothing, and only --force takes it -- after
which the host it was taken from can change nothing (its epoch is below the new floor)."""

from __future__ import annotations

import os
import subprocess
import time

import nbd
import pytest
from netswap.client.hostid import holder_id

from .conftest import free_port
from .nbdserver import NETSWAP, connect
from .procs import StoreProc, agent_log, agent_serve, stores

PAGE = 4096
AREA = f"shared{os.getpid()}"


def test_the_holder_names_the_host_and_differs_per_machine_and_area() -> None:
    a = holder_id("swap", machine="1" * 32, name="web1")
    assert a.startswith("web1/") and len(a) <= 128
    assert a != holder_id("swap", machine="2" * 32, name="web1")  # same name, another host
    assert a != holder_id("other", machine="1" * 32, name="web1")  # areas do not link up
    assert "1" * 32 not in a  # the machine id never reaches a store
    assert holder_id("swap", machine="", name="web1") == "web1"


def serve_as(machine: str, procs: list[StoreProc], *extra: str) -> subprocess.Popen[bytes]:
    port = free_port()
    cmd = [NETSWAP, "serve", "--listen", f"127.0.0.1:{port}", "--size", "16M", "--backend",
           "remote", "--no-mlock", "--area", AREA, "--no-encrypt", *extra]  # fmt: skip
    for p in procs:
        cmd += ["--store", p.address]
    with open(agent_log(port), "wb") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log,
                                env={**os.environ, "NETSWAP_MACHINE_ID": machine})  # fmt: skip


def test_a_second_host_is_refused_by_name_and_releases_nothing_until_force() -> None:
    env = {"NETSWAP_MACHINE_ID": "a" * 32}
    with stores(2) as procs, agent_serve(procs, "16M", "--area", AREA, "--no-encrypt",
                                         env=env) as (uri, _):  # fmt: skip
        h = connect(uri)
        h.pwrite(b"A" * PAGE, 0)
        other = serve_as("b" * 32, procs)
        try:
            assert other.wait(60) != 0  # it does not start
        finally:
            other.kill()
            other.wait()
        assert other.stderr is None
        text = agent_log_of(other)
        assert "held by" in text and holder_id(AREA, machine="a" * 32) in text
        assert "--force" in text and "Traceback" not in text
        assert h.pread(PAGE, 0) == b"A" * PAGE  # the holder's area is untouched
        forced = serve_as("b" * 32, procs, "--force")
        try:
            wait_listening(forced)
            refused = False
            for _ in range(40):  # taken: the old holder's writes are refused (ESTALE)
                try:
                    h.pwrite(b"Z" * PAGE, 0)
                except nbd.Error:
                    refused = True
                    break
                time.sleep(0.25)
            assert refused
        finally:
            forced.kill()
            forced.wait()
        h.shutdown()


def agent_log_of(proc: subprocess.Popen[bytes]) -> str:
    for arg in proc.args:  # type: ignore[union-attr]
        if isinstance(arg, str) and arg.startswith("127.0.0.1:"):
            return agent_log(int(arg.rsplit(":", 1)[1])).read_text()
    return ""


def wait_listening(proc: subprocess.Popen[bytes]) -> None:
    from .conftest import wait_for_port

    for arg in proc.args:  # type: ignore[union-attr]
        if isinstance(arg, str) and arg.startswith("127.0.0.1:"):
            wait_for_port(int(arg.rsplit(":", 1)[1]), proc, timeout=60)
            return


@pytest.mark.parametrize("name", ["a:b", "a*", "a?", "a[1]", "a}b", "-a", "a" * 65])
@pytest.mark.parametrize("tier", ["--store=127.0.0.1:1", "--cluster=redis://127.0.0.1:1"])
def test_an_area_name_that_could_name_another_area_is_refused_in_one_line(
    name: str, tier: str
) -> None:
    """On a Redis tier an area's ACL pattern (`~netswap:{AREA:*`) names exactly one area
    only when no area name holds ':', '}' or a glob character: area `a` would match
    area `a:b`'s keys, `a*` every area's. The protocol's rule, for every tier."""
    done = subprocess.run([NETSWAP, "serve", "--dry-run", "--backend", "remote", tier,
                           f"--area={name}"], capture_output=True, text=True, timeout=30,
                          check=False)  # fmt: skip
    assert done.returncode != 0
    assert "an area name is a letter or digit" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
