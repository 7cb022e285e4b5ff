"""The README says what the code does: settings table, serve usage, paths it names."""

from __future__ import annotations

import re
from pathlib import Path

from netswap.client.nbd.config import SETTINGS, settings_table

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def serve_usage() -> str:
    block = README[README.index("netswap serve  [") :]
    return block[: block.index("\nnetswap attach")]


def test_readme_holds_the_settings_table_made_from_the_code() -> None:
    assert settings_table() in README, "README's settings table is stale: paste settings_table()"


def test_readme_serve_usage_names_every_setting() -> None:
    usage = serve_usage()
    for s in SETTINGS:
        flag = f"[{s.serve_flag}]" if s.serve_flag else f"[--{s.key} "
        assert flag in usage, f"{flag} is missing from the README's serve usage"


def test_paths_the_readme_names_exist() -> None:
    named = set(re.findall(r"`((?:protocol|server|client|deploy|tests)/[\w./-]+\.(?:py|sh|json))`",
                           README))  # fmt: skip
    assert named, "the pattern found no paths: the check would pass vacuously"
    missing = sorted(p for p in named if not (REPO / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"
