"""A line chart as a PNG, in pure Python (zlib + struct): no plotting library to
install for one picture of RSS over time."""

from __future__ import annotations

import itertools
import struct
import zlib
from pathlib import Path

# One colour per series, cycled; the axes are grey.
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
AXIS = (120, 120, 120)
# 3x5 digits for the axis labels: each row a 3-bit mask.
DIGITS = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
}  # fmt: skip


def line_chart(path: Path, series: dict[str, list[tuple[float, float]]],
               width: int = 800, height: int = 400) -> None:  # fmt: skip
    """Plot (x, y) series on shared axes, y from 0; the legend is the series order."""
    pixels = [[(255, 255, 255)] * width for _ in range(height)]
    left, bottom, top, right = 40, height - 20, 10, width - 10
    points = [p for s in series.values() for p in s]
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y1 = max(p[1] for p in points) * 1.1 or 1.0

    def at(x: float, y: float) -> tuple[int, int]:
        px = left + (x - x0) / ((x1 - x0) or 1) * (right - left)
        py = bottom - y / y1 * (bottom - top)
        return int(px), int(py)

    for x in range(left, right):
        pixels[bottom][x] = AXIS
    for y in range(top, bottom):
        pixels[y][left] = AXIS
    _text(pixels, 2, top, str(int(y1)))
    _text(pixels, 2, bottom - 5, "0")
    _text(pixels, right - 20, bottom + 6, str(int(x1 - x0)))
    for n, (_, pts) in enumerate(series.items()):
        colour = COLOURS[n % len(COLOURS)]
        for (xa, ya), (xb, yb) in itertools.pairwise(pts):
            _segment(pixels, at(xa, ya), at(xb, yb), colour)
        for dx in range(12):  # legend swatch
            for dy in range(4):
                pixels[top + 4 + 8 * n + dy][right - 16 + dx] = colour
    _write(path, pixels)


def _segment(pixels: list[list[tuple[int, int, int]]], a: tuple[int, int], b: tuple[int, int],
             colour: tuple[int, int, int]) -> None:  # fmt: skip
    steps = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
    for i in range(steps + 1):
        x = a[0] + (b[0] - a[0]) * i // steps
        y = a[1] + (b[1] - a[1]) * i // steps
        for dy in (0, 1):
            if 0 <= y + dy < len(pixels) and 0 <= x < len(pixels[0]):
                pixels[y + dy][x] = colour


def _text(pixels: list[list[tuple[int, int, int]]], x: int, y: int, text: str) -> None:
    for n, ch in enumerate(text):
        for row, mask in enumerate(DIGITS.get(ch, (0,) * 5)):
            for col in range(3):
                if mask & (4 >> col) and 0 <= y + row < len(pixels):
                    pixels[y + row][x + 4 * n + col] = AXIS


def _write(path: Path, pixels: list[list[tuple[int, int, int]]]) -> None:
    height, width = len(pixels), len(pixels[0])
    raw = b"".join(b"\0" + bytes(c for px in row for c in px) for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png + chunk(b"IEND", b""))
