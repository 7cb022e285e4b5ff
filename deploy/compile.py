"""Compile netswap's hot modules with mypyc, in place (`make setup` runs this).

mypyc compiles a module of the project's own `mypy --strict` source into a C
extension that sits beside the .py file; Python's import system prefers the
extension, nbdkit's embedded interpreter included, and when it is absent the
.py runs as before. Each module is built on its own (`separate`), so none needs
a shared runtime library outside its package. A module is listed here only
while a measurement shows it pays: `python -m tests.bench.bench_compiled`
times each one's hot functions compiled and pure in the same run, and the
numbers in COMPILED are that benchmark's.

  python deploy/compile.py           build what changed (a no-op when nothing did)
  python deploy/compile.py --clean   remove every compiled module (pure Python again)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"protocol": "netswap.protocol", "server": "netswap.server", "client": "netswap.client"}
# Module (its path under the repo) -> why it is compiled (tests/bench/bench_compiled.py).
COMPILED: dict[str, str] = {
    "protocol/codec.py": "decoding and framing batches",
    "protocol/connection.py": "buffering and parsing frames",
    "protocol/runs.py": "runs of slots",
    "server/backends/base.py": "the store's bookkeeping (its subclasses must be compiled)",
    "server/backends/runs.py": "the store's page I/O",
    "server/backends/payloads.py": "shorter payloads' I/O (a subclass of runs.py's)",
    "server/backends/objects.py": "the size classes' bookkeeping",
    "server/backends/memory.py": "the memory store",
    "server/backends/file.py": "the file store",
    "server/backends/slotmap.py": "the store's slot maps",
    "server/service.py": "the store's request dispatch",
    "client/agent/machine/slots.py": "the agent's per-slot state",
    "client/agent/machine/table.py": "the agent's slab table",
    "client/agent/machine/machine.py": "the agent's replica machine",
    "client/agent/batches.py": "the agent's batches",
    "client/agent/jobs.py": "the agent's jobs",
}
BUILD = ROOT / ".cache" / "mypyc"
STAMP = BUILD / "stamp"


def compiled_files() -> list[Path]:
    """Every extension module this script may have built, anywhere in the packages."""
    return [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.so")]


def clean() -> int:
    removed = compiled_files()
    for path in removed:
        path.unlink()
    STAMP.unlink(missing_ok=True)
    print(f"compile: removed {len(removed)} compiled modules (pure Python)")
    return 0


def fingerprint(modules: list[str]) -> str:
    """The sources, the compiler and this list: what a build depends on."""
    import mypy.version

    digest = hashlib.sha256(mypy.version.__version__.encode() + sys.version.encode())
    for pkg in PACKAGES:  # every module: a compiled one reads its imports' types
        for path in sorted((ROOT / pkg).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + path.read_bytes())
    digest.update(" ".join(modules).encode())
    return digest.hexdigest()


def build(modules: list[str]) -> int:
    wanted = fingerprint(modules)
    if STAMP.exists() and STAMP.read_text() == wanted and compiled_files():
        print(f"compile: {len(modules)} modules up to date")
        return 0
    clean()
    # mypyc names modules by their path: build from a tree that mirrors the installed
    # layout (netswap/protocol -> protocol, ...), so `netswap.protocol.codec` it is.
    tree = BUILD / "tree"
    (tree / "netswap").mkdir(parents=True, exist_ok=True)
    for pkg in PACKAGES:
        link = tree / "netswap" / pkg
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(ROOT / pkg)
    os.chdir(tree)
    from mypyc.build import mypycify
    from setuptools import setup

    paths = [f"netswap/{m}" for m in modules]
    setup(
        name="netswap-compiled",
        ext_modules=mypycify(
            [*paths, "--config-file", str(ROOT / "pyproject.toml")], separate=True, opt_level="3"
        ),
        script_args=[
            "-q",
            "build_ext",
            "--inplace",
            "--build-temp",
            str(BUILD / "temp"),
            "--build-lib",
            str(BUILD / "lib"),
        ],
    )
    STAMP.write_text(wanted)
    print(f"compile: built {len(modules)} modules with mypyc ({len(compiled_files())} files)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clean", action="store_true", help="remove the compiled modules")
    parser.add_argument("--only", help="comma list of modules (paths) instead of COMPILED")
    args = parser.parse_args()
    if args.clean:
        return clean()
    if shutil.which("gcc") is None:
        print("compile: no gcc (apt-get install gcc python3-dev): pure Python", file=sys.stderr)
        return 0
    modules = args.only.split(",") if args.only else list(COMPILED)
    return build(modules)


if __name__ == "__main__":
    sys.exit(main())
