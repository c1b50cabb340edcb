"""Image sizes "HxW": parse, format, and check that they fit the codec × patch grid (rounding only when asked)."""
from __future__ import annotations

import logging
from typing import Iterable

log = logging.getLogger(__name__)

ROUND_MODES = ("nearest", "floor")


def parse_size(text: str | int | Iterable[int]) -> tuple[int, int]:
    """"320x960" / "320×960" / "256" / 256 / (320, 960) -> (H, W) in pixels."""
    if isinstance(text, int):
        h = w = text
    elif isinstance(text, str):
        parts = text.strip().lower().replace("×", "x").split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size {text!r} is not of the form HxW (e.g. 320x960) or a single side (e.g. 256)")
        h, w = (int(parts[0]), int(parts[-1]))
    else:
        values = [int(v) for v in text]
        if len(values) != 2:
            raise ValueError(f"size {text!r} must have two entries (H, W)")
        h, w = values
    if h <= 0 or w <= 0:
        raise ValueError(f"size {h}x{w} must be positive")
    return h, w


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """"256x256,320x960" -> [(256, 256), (320, 960)]; duplicates are an error (they would share one output folder)."""
    sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise ValueError(f"no sizes in {text!r}; pass e.g. --sizes 256x256,320x960")
    dupes = sorted({s for s in sizes if sizes.count(s) > 1})
    if dupes:
        raise ValueError(f"sizes {[format_size(s) for s in dupes]} are listed more than once in {text!r}")
    return sizes


def format_size(size: tuple[int, int]) -> str:
    """(320, 960) -> "320x960" (the folder name of that size's samples)."""
    return f"{int(size[0])}x{int(size[1])}"


def _round_side(side: int, multiple: int, mode: str) -> int:
    down = (side // multiple) * multiple
    if mode == "floor":
        return max(down, multiple)  # a side below one multiple cannot floor to 0: it becomes one multiple
    up = down + multiple
    # Ties go up (250 with multiple 4 -> 252): the larger image keeps all requested pixels.
    if down == 0 or side - down >= up - side:
        return up
    return down


def validate_size(size: tuple[int, int], multiple: int, *, round: str | None = None) -> tuple[int, int]:
    """Check that both sides are multiples of `multiple` (codec factor × patch size); round only when asked, and log it."""
    h, w = parse_size(size)
    if multiple <= 0:
        raise ValueError(f"size multiple must be positive, got {multiple}")
    if h % multiple == 0 and w % multiple == 0:
        return h, w
    nearest = (_round_side(h, multiple, "nearest"), _round_side(w, multiple, "nearest"))
    floor = (_round_side(h, multiple, "floor"), _round_side(w, multiple, "floor"))
    if round is None:
        raise ValueError(
            f"image size {h}x{w} is not a multiple of {multiple} (codec factor × patch size); nearest valid sizes: "
            f"{format_size(nearest)} (--round nearest) or {format_size(floor)} (--round floor); or request one of them"
        )
    if round not in ROUND_MODES:
        raise ValueError(f"round={round!r} is not one of {ROUND_MODES}")
    out = nearest if round == "nearest" else floor
    log.warning("size %dx%d is not a multiple of %d: rounded (%s) to %s", h, w, multiple, round, format_size(out))
    return out
