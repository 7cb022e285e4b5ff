"""Who may bind which area: the store's token file, read once at start.

A connection's Hello names an area and a token; the store checks the token
against every candidate with hmac.compare_digest (timing says nothing about
which one matched) and binds the connection to that area for good.
"""

from __future__ import annotations

import hmac
from pathlib import Path

ADMIN = "@admin"  # not an area name (those start with a letter or digit)


class Tokens:
    """Who may bind which area. File lines: `TOKEN` (any area), `AREA TOKEN`, or
    `@admin TOKEN` (any area, and Stats shows the whole store, every area's load)."""

    def __init__(
        self, any_area: list[str], per_area: dict[str, str], admin: list[str] | None = None
    ) -> None:
        self.any_area = any_area
        self.per_area = per_area
        self.admin = admin or []

    @classmethod
    def open(cls) -> Tokens:
        return cls([], {})

    @classmethod
    def from_file(cls, path: str | Path) -> Tokens:
        any_area: list[str] = []
        per_area: dict[str, str] = {}
        admin: list[str] = []
        for raw in Path(path).read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) == 1:
                any_area.append(parts[0])
            elif len(parts) == 2 and parts[0] == ADMIN:
                admin.append(parts[1])
            elif len(parts) == 2:
                per_area[parts[0]] = parts[1]
            else:
                raise ValueError(f"{path}: expected 'TOKEN' or 'AREA TOKEN', got {line!r}")
        if not any_area and not per_area and not admin:
            raise ValueError(f"{path}: no tokens")
        return cls(any_area, per_area, admin)

    @property
    def required(self) -> bool:
        return bool(self.any_area or self.per_area or self.admin)

    def is_admin(self, token: str) -> bool:
        """An admin token, or any client of a store with no tokens (loopback only)."""
        if not self.required:
            return True
        return any([hmac.compare_digest(token.encode(), a.encode()) for a in self.admin])

    def allows(self, area: str, token: str) -> bool:
        if not self.required:
            return True
        given = token.encode()
        candidates = [*self.any_area, *self.admin, self.per_area.get(area, "")]
        # compare_digest on every candidate: timing does not reveal which matched.
        matches = [hmac.compare_digest(given, c.encode()) for c in candidates if c]
        return any(matches)
