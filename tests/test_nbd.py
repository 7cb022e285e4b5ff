"""The NBD face: real nbdkit running the plugin, driven by real NBD clients."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import subprocess
import threading
from pathlib import Path

import nbd
import pytest

from .conftest import free_port, wait_for_port
from .nbdserver import NETSWAP, connect, errno_of, kill_and_read_stderr, netswap_serve

PAGE = 4096
MiB = 1 << 20


def test_size_block_size_and_flags_as_advertised() -> None:
    with netswap_serve("--size", "64M", mlock=True) as uri:
        info = json.loads(
            subprocess.run(["nbdinfo", "--json", uri], capture_output=True, check=True).stdout
        )
        (export,) = info["exports"]
        assert export["export-size"] == 64 * MiB
        assert export["block_size_minimum"] == PAGE
        assert export["block_size_preferred"] == PAGE
        for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
            assert export[flag] is True, flag
        assert export["is_read_only"] is False
        h = connect(uri)
        assert h.get_size() == 64 * MiB
        assert h.get_block_size(nbd.SIZE_MINIMUM) == PAGE
        h.shutdown()


def test_random_writes_from_several_connections_read_back_byte_for_byte() -> None:
    pages = 8192  # 32 MiB
    with netswap_serve("--size", "32M") as uri:
        truth: dict[int, bytes] = {}
        lock = threading.Lock()
        errors: list[BaseException] = []

        def writer(n: int) -> None:
            try:
                rng = random.Random(n)
                h = connect(uri)
                # Each connection owns a quarter of the export: no two write one page.
                base, span = n * pages // 4, pages // 4
                for _ in range(300):
                    count = rng.choice([1, 1, 2, 8, 32])
                    first = base + rng.randrange(0, span - count + 1)
                    data = rng.randbytes(count * PAGE)
                    h.pwrite(data, first * PAGE)
                    with lock:
                        for i in range(count):
                            truth[first + i] = data[i * PAGE : (i + 1) * PAGE]
                h.flush()
                h.shutdown()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        reader = connect(uri)
        image = reader.pread(pages * PAGE, 0)
        for page, data in truth.items():
            assert image[page * PAGE : (page + 1) * PAGE] == data, page
        untouched = set(range(pages)) - set(truth)
        assert all(image[p * PAGE : (p + 1) * PAGE] == bytes(PAGE) for p in untouched)
        reader.shutdown()


def test_trim_zero_flush_and_fua() -> None:
    with netswap_serve("--size", "16M") as uri:
        h = connect(uri)
        data = os.urandom(16 * PAGE)
        h.pwrite(data, 0, nbd.CMD_FLAG_FUA)
        h.trim(4 * PAGE, 4 * PAGE)
        h.zero(2 * PAGE, 10 * PAGE)
        h.flush()
        got = h.pread(16 * PAGE, 0)
        expect = data[: 4 * PAGE] + bytes(4 * PAGE) + data[8 * PAGE : 10 * PAGE]
        expect += bytes(2 * PAGE) + data[12 * PAGE :]
        assert got == expect
        # Trim is advisory: a misaligned trim frees only whole pages inside it.
        h2 = connect(uri, strict=False)
        h2.trim(2 * PAGE, 100)  # covers [100, 8292): only page 1 is whole
        assert h2.pread(PAGE, 0) == data[:PAGE]
        assert h2.pread(PAGE, PAGE) == bytes(PAGE)
        # Extents report the trimmed pages as holes.
        holes: list[tuple[int, int]] = []

        def collect(meta: str, offset: int, entries: list[int], err: object) -> int:
            for i in range(0, len(entries), 2):
                if entries[i + 1] & nbd.STATE_HOLE:
                    holes.append((offset, entries[i]))
                offset += entries[i]
            return 0

        h.block_status(16 * PAGE, 0, collect)
        assert holes and holes[0][0] == PAGE
        h.shutdown()
        h2.shutdown()


def test_misaligned_and_out_of_range_requests_fail_and_corrupt_nothing() -> None:
    with netswap_serve("--size", "8M") as uri:
        h = connect(uri, strict=False)
        data = os.urandom(4 * PAGE)
        h.pwrite(data, 0)
        for call in (
            lambda: h.pwrite(b"x" * 512, 512),
            lambda: h.pwrite(b"x" * (PAGE + 1), 0),
            lambda: h.pread(100, 10),
            lambda: h.zero(512, PAGE),
        ):
            with pytest.raises(nbd.Error) as info:
                call()
            assert errno_of(info.value) == errno.EINVAL
        with pytest.raises(nbd.Error):
            h.pwrite(b"y" * PAGE, 8 * MiB)
        with pytest.raises(nbd.Error):
            h.pread(2 * PAGE, 8 * MiB - PAGE)
        assert h.pread(4 * PAGE, 0) == data
        h.shutdown()


def test_full_thin_export_answers_enospc_and_keeps_serving() -> None:
    with netswap_serve("--size", "16M", "--capacity", "1M") as uri:
        h = connect(uri)
        h.pwrite(b"a" * MiB, 0)
        with pytest.raises(nbd.Error) as info:
            h.pwrite(b"b" * PAGE, 8 * MiB)
        assert errno_of(info.value) == errno.ENOSPC
        h.trim(MiB, 0)
        h.pwrite(b"b" * PAGE, 8 * MiB)
        assert h.pread(PAGE, 8 * MiB) == b"b" * PAGE
        h.shutdown()


def test_nbdcopy_and_qemu_img_round_trip_a_64mib_image(tmp_path: Path) -> None:
    image = tmp_path / "in.img"
    image.write_bytes(os.urandom(64 * MiB))
    out = tmp_path / "out.img"
    with netswap_serve("--size", "64M") as uri:
        subprocess.run(["nbdcopy", str(image), uri], check=True, timeout=120)
        subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=120)
        compare = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert compare.returncode == 0, compare.stdout + compare.stderr
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (image, out)]
    assert digest[0] == digest[1]


def test_file_backend_survives_kill_after_flush(tmp_path: Path) -> None:
    args = ("--size", "16M", "--backend", "file", "--path", str(tmp_path / "pages"))
    data = os.urandom(64 * PAGE)
    with netswap_serve(*args) as uri:
        h = connect(uri)
        h.pwrite(data, 0)
        h.flush()
        h.pwrite(b"z" * PAGE, 0)  # not flushed: may be lost, must not corrupt
    with netswap_serve(*args) as uri:  # the previous nbdkit was killed with SIGKILL
        h = connect(uri)
        first = h.pread(PAGE, 0)
        assert first in (data[:PAGE], b"z" * PAGE)
        assert h.pread(63 * PAGE, PAGE) == data[PAGE:]
        h.shutdown()


def test_checksum_failure_reaches_the_client_as_eio(tmp_path: Path) -> None:
    store = tmp_path / "pages"
    args = ("--size", "4M", "--backend", "file", "--path", str(store))
    with netswap_serve(*args) as uri:
        h = connect(uri)
        h.pwrite(b"q" * (2 * PAGE), 0)
        h.flush()
        h.shutdown()
    with open(store / "pages", "r+b") as f:  # rot one byte of the first page on disk
        f.seek(10)
        f.write(b"!")
    with netswap_serve(*args) as uri:
        h = connect(uri)
        with pytest.raises(nbd.Error) as info:
            h.pread(PAGE, 0)
        assert errno_of(info.value) == errno.EIO
        assert h.pread(PAGE, PAGE) == b"q" * PAGE
        h.shutdown()


def run_serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NETSWAP, "serve", *args], capture_output=True, text=True, timeout=30, env=env
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--size", "1000"), "multiple of 4096"),
        (("--size", "1G", "--backend", "file"), "needs path"),
        (("--size", "1G", "--backend", "remote"), "needs at least one store"),
        (("--size", "1G", "--store", "127.0.0.1:1"), "only for backend=remote"),
        (("--listen", "127.0.0.1:70000"), "port out of range"),
        (("--backend", "remote", "--store", "127.0.0.1:1", "--replicas", "2"), "needs 2 store"),
        (("--backend", "remote", "--store", "a:1", "--store", "b:1", "--quorum", "3"), "quorum=3"),
        (("--size", "1G", "--cache", "writeback"), "cache=writeback is only for backend=remote"),
    ],
)
def test_serve_rejects_bad_options_with_one_line(args: tuple[str, ...], message: str) -> None:
    result = run_serve(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_names_the_missing_package_and_busy_port() -> None:
    env = {**os.environ, "PATH": "/nonexistent"}
    result = run_serve("--size", "1G", env=env)
    assert result.returncode == 2 and "apt-get install nbdkit" in result.stderr
    with netswap_serve("--size", "4M") as uri:
        port = uri.split(":")[2].split("/")[0]
        busy = run_serve("--size", "4M", "--listen", f"127.0.0.1:{port}")
        assert busy.returncode == 2 and "already in use" in busy.stderr


def test_dry_run_shows_the_nbdkit_command() -> None:
    result = run_serve("--size", "2G", "--dry-run")
    assert result.returncode == 0
    line = result.stdout.strip()
    assert "--exit-with-parent" in line and "size=2G" in line
    # The plugin locks memory itself (mlockall MCL_ONFAULT); nbdkit's --swap would pin
    # its whole 192 MiB .bss. --no-mlock turns the plugin's locking off.
    assert "--swap" not in line and "mlock=" not in line
    off = run_serve("--size", "2G", "--dry-run", "--no-mlock").stdout
    assert "mlock=off" in off and "--swap" not in off


def rollup_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("Locked", "Rss", "Pss"):
            fields[name] = int(rest.split()[0])
    return fields


@pytest.mark.parametrize("mlock", [True, False])
def test_serve_locks_what_it_touches_and_only_that(mlock: bool) -> None:
    """mlockall(MCL_ONFAULT) from the plugin: every resident page locked, the 192 MiB
    .bss and the 1 GiB arena not populated (nbdkit --swap pinned 1.3 GB here)."""
    port = free_port()
    cmd = [NETSWAP, "serve", "--listen", f"127.0.0.1:{port}", "--size", "1G"]
    proc = subprocess.Popen([*cmd, *([] if mlock else ["--no-mlock"])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_for_port(port, proc)
        h = connect(f"nbd://127.0.0.1:{port}/swap")
        h.pwrite(b"\x5a" * (8 * MiB), 0)  # 8 MiB of the arena now resident
        h.shutdown()
        kib = rollup_kib(proc.pid)
    finally:
        err = kill_and_read_stderr(proc)
    assert kib["Rss"] < 120 * 1024, f"{kib}: the arena or .bss was populated"
    if mlock:  # Locked is proportional, like Pss: a shared libc page counts a share
        assert "mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT): ok" in err, err
        assert kib["Locked"] >= 0.95 * kib["Pss"], kib
        assert kib["Locked"] >= 8 * 1024, kib  # the written pages are locked too
    else:
        assert kib["Locked"] == 0, kib
