"""Imports go one way: protocol <- server <- client, and inside client, upwards only.

Every import in every module counts, including lazy ones inside functions and
those under TYPE_CHECKING: a layer must not even name a higher one.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# netswap.X -> its folder in the checkout (pyproject's package-dir).
ROOTS = {"protocol": REPO / "protocol", "server": REPO / "server", "client": REPO / "client",
         "lab": REPO / "lab"}  # fmt: skip
# Lower number = lower layer. Longest matching prefix wins.
LAYERS = {
    "netswap.protocol": 0,
    "netswap.server": 1,
    # The host side, bottom up: shared pieces, the agent, the NBD face, the CLI.
    "netswap.client": 2,
    "netswap.client.agent": 3,
    "netswap.client.nbd": 4,
    "netswap.client.cli": 5,
    # Test and demo tooling, above the host (the CLI finds `lab` by its entry point).
    "netswap.lab": 6,
}


def layer_of(module: str) -> int | None:
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def module_name(path: Path) -> str:
    for top, root in ROOTS.items():
        if path.is_relative_to(root):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            return ".".join(("netswap", top, *parts))
    raise ValueError(path)


def imported(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in `source`, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from netswap.client import agent` names a submodule, not just a package.
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    own = layer_of(module)
    assert own is not None, module
    out = []
    for line, target in imported(source, module, is_package):
        rank = layer_of(target)
        if rank is not None and rank > own:
            out.append(f"{module}:{line} imports {target} (a higher layer)")
    return out


def test_no_module_imports_a_higher_layer() -> None:
    problems = []
    for root in ROOTS.values():
        for path in sorted(root.rglob("*.py")):
            module = module_name(path)
            problems += violations(path.read_text(), module, path.name == "__init__.py")
    assert not problems, "\n".join(problems)


def test_the_check_catches_upward_imports_eager_lazy_and_relative() -> None:
    eager = "from netswap.client.rpc import StoreClient\n"
    lazy = "def f():\n    from netswap.client.agent.core import Agent\n"
    typing_only = "if TYPE_CHECKING:\n    from netswap.server.app import StoreServer\n"
    relative = "from ..nbd.config import PluginConfig\n"
    submodule = "from netswap.client import cli\n"
    assert violations(eager, "netswap.server.service")
    assert violations(lazy, "netswap.server.ops.sources")
    assert violations(typing_only, "netswap.protocol.messages")
    assert violations(relative, "netswap.client.agent.device")
    assert violations(submodule, "netswap.client.nbd.serve")
    # Downward and sideways imports are fine.
    assert not violations("from ..device import BlockDevice\n", "netswap.client.agent.device")
    assert not violations("from .links import StoreLink\n", "netswap.client.agent.core")
    assert not violations("from netswap.protocol import PAGE_SIZE\n", "netswap.server.service")


def test_the_supervisor_package_imports_only_the_stdlib_and_itself() -> None:
    """attach runs netswap.client.supervise as a top-level package without site
    (supervise/__init__.py): one netswap import, or a relative one out of it, breaks it."""
    root = ROOTS["client"] / "supervise"
    problems = []
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                problems.append(f"{path.name}:{node.lineno} imports out of the package")
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            ours = [n for n in names if n.split(".")[0] in {"netswap", "client", "server"}]
            problems += [f"{path.name}:{node.lineno} imports {n}" for n in ours]
    assert not problems, problems
    assert len(list(root.glob("*.py"))) >= 6
