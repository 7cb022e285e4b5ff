"""The corpus's sources: real programs doing real work, each started here.

A source is a context manager: it starts its program on real input from this
machine, waits until the work is done (or, for the compiler, under way), yields
the pid whose memory to read, and ends the program when the block exits. The
generator reads the pages inside the block, so every source is sampled at the
moment its docstring names.

The QEMU guest's own swapped pages (issue 31's fourth example) are not a source
yet: they need the lab's guest to swap to a device whose slots the host can read
back (e.g. a raw swap image on the host, or the agent's store). A source that
boots it, runs a workload past the guest's RAM and yields the pages of the swap
image's used slots would fit the same shape; see RESULTS.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sysconfig
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from netswap.lab.ports import free_port, wait_port

from . import texts

REPO = Path(__file__).resolve().parents[2]
Starter = Callable[[Path], AbstractContextManager[int]]


@dataclass(frozen=True)
class Source:
    name: str
    about: str  # the real work, for the manifest and the results
    start: Starter
    program: str = ""  # the program it runs, and the Debian package that has it
    package: str = ""

    def missing(self) -> str:
        """Why this source cannot run here, or "" when it can."""
        if self.program and shutil.which(self.program) is None:
            return f"{self.program} not found (apt-get install {self.package})"
        return ""


@contextlib.contextmanager
def child(cmd: list[str], ready: str = "ready", timeout: float = 180) -> Iterator[int]:
    """Run cmd; yield its pid once it prints `ready` on stdout; close its stdin to end it."""
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            line = proc.stdout.readline().decode().strip()  # blocks until ready, or EOF on exit
            if line != ready:
                raise RuntimeError(f"{cmd[0]} ended before it was ready (said {line!r})")
            yield proc.pid
        finally:
            proc.stdin.close()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()


WORK = Path(__file__).resolve().parent / "work"


def python_dict(work: Path) -> AbstractContextManager[int]:
    """/usr/bin/python3 holding the dpkg database as dicts, the stdlib as ASTs, word counts."""
    stdlib = sysconfig.get_paths(vars={"base": "/usr", "installed_base": "/usr"})["stdlib"]
    return child(["/usr/bin/python3", str(WORK / "pydict.py"), stdlib])


# Budget of man-page text loaded into redis, sqlite and node (each): enough for
# hundreds of MB of process memory once parsed and indexed, and 64 MiB caps the
# sample anyway; the sources load in under a minute each on 2 vCPUs.
MAN_BUDGET = 96 << 20


@contextlib.contextmanager
def redis_server(work: Path) -> Iterator[int]:
    """Debian's redis-server holding the dpkg database (hashes, lists, sets, a sorted set),
    the licences and man pages (strings), loaded through redis-py pipelines."""
    import redis

    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    cmd += ["--appendonly", "no", "--dir", str(work), "--protected-mode", "yes"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        wait_port(port, lambda: proc.poll() is None, 30)
        with redis.Redis(port=port) as db:
            pipe = db.pipeline(transaction=False)
            for rec in texts.dpkg_records():
                name = rec.get("Package", "?")
                pipe.hset(f"pkg:{name}", mapping=rec)
                pipe.set(f"desc:{name}", rec.get("Description", ""))
                deps = [d.strip() for d in rec.get("Depends", "").split(",") if d.strip()]
                if deps:
                    pipe.rpush(f"deps:{name}", *deps)
                pipe.sadd(f"section:{rec.get('Section', 'none')}", name)
                pipe.zadd("installed-size", {name: int(rec.get("Installed-Size", "0") or 0)})
            pipe.execute()
            for name, text in [*texts.licenses(), *texts.man_pages(MAN_BUDGET)]:
                pipe.set(f"text:{name}", text)
                if len(pipe) >= 256:
                    pipe.execute()
            pipe.execute()
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(30)


def sql_text(value: str) -> str:
    return "'" + value.replace("'", "''").replace("\x00", "") + "'"


@contextlib.contextmanager
def sqlite(work: Path) -> Iterator[int]:
    """The sqlite3 shell with an in-memory database: the dpkg fields as rows with an index,
    and the man pages in a full-text (FTS5) index, queried once."""
    script = work / "load.sql"
    with script.open("w") as sql:
        sql.write("CREATE TABLE field(pkg TEXT, key TEXT, value TEXT);\nBEGIN;\n")
        for rec in texts.dpkg_records():
            name = sql_text(rec.get("Package", "?"))
            for key, value in rec.items():
                sql.write(f"INSERT INTO field VALUES({name},{sql_text(key)},{sql_text(value)});\n")
        sql.write("COMMIT;\nCREATE INDEX by_key ON field(key, value);\n")
        sql.write("CREATE VIRTUAL TABLE man USING fts5(name, body);\nBEGIN;\n")
        for name, text in texts.man_pages(MAN_BUDGET):
            sql.write(f"INSERT INTO man VALUES({sql_text(name)},{sql_text(text)});\n")
        sql.write("COMMIT;\n")
    done = work / "sqlite.ready"
    done.unlink(missing_ok=True)
    proc = subprocess.Popen(["sqlite3", ":memory:"], stdin=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None
        proc.stdin.write(f".read {script}\n.once {done}\n")
        proc.stdin.write("SELECT count(*) FROM man WHERE man MATCH 'memory AND swap';\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 300
        while not (done.exists() and done.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("sqlite3 ended or stalled before its load was done")
            time.sleep(0.2)
        yield proc.pid
    finally:
        if proc.stdin:
            proc.stdin.close()
        proc.wait(30)


def node(work: Path) -> AbstractContextManager[int]:
    """node (V8) holding the dpkg database as objects, a word index over descriptions and
    man pages, and a JSON copy."""
    return child(["node", str(WORK / "index.js"), str(MAN_BUDGET // 2)])


def largest_generated_c() -> Path | None:
    """The largest mypyc-generated C file deploy/compile.py left in its build tree."""
    files = sorted(
        (REPO / ".cache" / "mypyc").rglob("__native_*.c"), key=lambda p: p.stat().st_size
    )
    return files[-1] if files else None


# cc1 on the largest mypyc file runs ~12 s and peaks near 150 MB here; at 6 s it is
# past parsing and into the optimisation passes.
CC1_DELAY = 6.0


@contextlib.contextmanager
def cc1(work: Path) -> Iterator[int]:
    """gcc -O2 compiling a mypyc-generated C file of this project, cc1 read mid-build."""
    import mypyc

    source = largest_generated_c()
    if source is None:
        raise RuntimeError("no mypyc-generated C file in .cache/mypyc: run `make setup` first")
    librt = Path(mypyc.__file__).parent / "lib-rt"
    include = sysconfig.get_paths()["include"]
    cmd = ["gcc", "-O2", f"-I{include}", f"-I{librt}", f"-I{source.parent}"]
    cmd += [f"-I{REPO / '.cache/mypyc/tree/build'}", "-c", str(source), "-o", str(work / "out.o")]
    gcc = subprocess.Popen(cmd, start_new_session=True)  # its own group: cc1 ends with it
    try:
        pid = 0
        deadline = time.monotonic() + 30
        while not pid and time.monotonic() < deadline and gcc.poll() is None:
            for tid in os.listdir(f"/proc/{gcc.pid}/task"):
                kids = Path(f"/proc/{gcc.pid}/task/{tid}/children").read_text().split()
                pid = pid or next((int(k) for k in kids if comm(int(k)) == "cc1"), 0)
            time.sleep(0.05)
        if not pid:
            raise RuntimeError("gcc started no cc1")
        time.sleep(CC1_DELAY)
        if comm(pid) != "cc1":
            raise RuntimeError(f"cc1 ended within {CC1_DELAY} s: lower CC1_DELAY")
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(gcc.pid, signal.SIGKILL)
        gcc.wait()


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


# make setup installs python3, redis-server and gcc; node and sqlite3 are the corpus's own.
SOURCES = [
    Source("python", "python3 3.11: dpkg status as dicts, the stdlib as ASTs", python_dict),
    Source("redis", "redis-server 7: dpkg status, licences, man pages", redis_server,
           "redis-server", "redis-server"),
    Source("cc1", "gcc -O2 on a mypyc-generated C file, mid-build", cc1, "gcc", "gcc"),
    Source("node", "node: dpkg status as objects, a word index, JSON", node, "node", "nodejs"),
    Source("sqlite", "sqlite3 :memory: dpkg fields with an index, man pages in FTS5", sqlite,
           "sqlite3", "sqlite3"),
]  # fmt: skip
