"""protocol/ is sans-IO: importing it must pull in no I/O framework."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

FORBIDDEN = {"asyncio", "socket", "uvloop", "nbdkit", "selectors", "ssl", "trio"}
PROTOCOL_DIR = Path(__file__).resolve().parent.parent / "protocol"


def test_protocol_sources_import_no_io_module() -> None:
    for path in PROTOCOL_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"


def test_importing_protocol_loads_no_io_module() -> None:
    code = (
        "import sys, netswap.protocol\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
