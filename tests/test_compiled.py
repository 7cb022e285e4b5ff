"""The compiled modules (deploy/compile.py): loaded when built, and the same code pure."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "deploy"))
from compile import COMPILED  # noqa: E402

sys.path.pop(0)


def module_name(path: str) -> str:
    return "netswap." + path.removesuffix(".py").replace("/", ".")


def test_every_listed_module_is_compiled_when_built() -> None:
    built = list((REPO / "protocol").glob("*.so"))
    if not built:
        pytest.skip("no compiled modules here (deploy/compile.py was not run)")
    for path in COMPILED:
        module = importlib.import_module(module_name(path))
        assert module.__file__ is not None and module.__file__.endswith(".so"), path


# Loads every netswap module from its .py source (the finder goes before the extension
# loader), then runs a batch through both ends of the protocol and a store backend.
PURE = r"""
import importlib.abc, importlib.util, sys
from pathlib import Path
ROOT = Path(sys.argv[1])
class Source(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        parts = name.split(".")
        if len(parts) < 3 or parts[0] != "netswap":
            return None
        base = ROOT / parts[1] / Path(*parts[2:])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.exists():
                pkg = [str(candidate.parent)] if candidate.name == "__init__.py" else None
                return importlib.util.spec_from_file_location(name, candidate,
                                                              submodule_search_locations=pkg)
        return None
sys.meta_path.insert(0, Source())
from array import array
import netswap.protocol as p
from netswap.server.backends import MemoryBackend
from netswap.client.agent.machine.slots import Slots
loaded = [m.__file__ for n, m in sorted(sys.modules.items()) if n.startswith("netswap.")]
assert all(f.endswith(".py") for f in loaded if f), loaded
client, server = p.Connection(p.Role.CLIENT), p.Connection(p.Role.SERVER)
server.receive_data(client.send(p.Hello(0, p.PROTOCOL_VERSION, "a", "")))
server.next_event()
client.receive_data(server.send(p.Welcome(0, p.PROTOCOL_VERSION, 0, 1)))
client.next_event()
out = p.SwapOut(1, [3, 4, 9], bytes(range(256)) * 48, [1, 2, 3], [5, 6, 7])
server.receive_data(client.send(out))
got = server.next_event()
assert got == out, got
backend = MemoryBackend(64)
area = backend.activate("a", 64)
backend.write_runs(area, got.runs, got.data, None)
data = memoryview(bytearray(3 * 4096))
backend.read_runs(area, got.runs, data)
assert bytes(data) == bytes(out.data)
gens = Slots(16, epoch=2).write(3, 2)
assert list(gens) == [2 << 32 | 1] * 2
print("pure ok", len(loaded))
"""


def test_the_same_code_runs_pure_without_the_build() -> None:
    done = subprocess.run([sys.executable, "-c", PURE, str(REPO)], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pure ok")
