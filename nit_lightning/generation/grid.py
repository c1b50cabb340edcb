"""A labelled picture of samples: one row per size (its label on the left), one column per class or prompt (its label
on top, wrapped to the column's width so that a caption fits as well as "class 3"). Used by `sample` (OUT/grid.png),
the sweeps (a grid per setting) and the demo report.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from nit_lightning.records import write_with

Row = tuple[str, Sequence[np.ndarray | None]]  # (row label, one HWC uint8 image per column; None leaves a gap)
GAP = 4  # pixels between cells
MIN_COLUMN = 56  # a column is at least this wide, so that "class 10" fits above a 32 px image
LINE = 14  # pixels per text line
MAX_HEADER_LINES = 4  # a long prompt is cut after this many lines (…)


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def wrap(text: str, width: int, measure) -> list[str]:
    """Greedy word wrap of `text` to `width` pixels (a word longer than the width stands alone), at most
    MAX_HEADER_LINES lines."""
    lines: list[str] = []
    for word in text.split():
        if lines and measure(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > MAX_HEADER_LINES:
        lines = lines[:MAX_HEADER_LINES - 1] + [lines[MAX_HEADER_LINES - 1] + " …"]
    return lines or [""]


def labelled_grid(rows: Sequence[Row], columns: Sequence[str], title: str | None = None):
    """A PIL image: rows of images under column labels, each row labelled on the left, on white."""
    from PIL import Image, ImageDraw

    if not rows or not columns:
        raise ValueError("a grid needs at least one row and one column")
    font = _font()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    widths = [max([MIN_COLUMN] + [img.shape[1] for _, imgs in rows for img in imgs[j:j + 1] if img is not None])
              for j in range(len(columns))]
    heights = [max([LINE] + [img.shape[0] for img in imgs if img is not None]) for _, imgs in rows]
    headers = [wrap(text, w, lambda s: measure(s, font=font)) for text, w in zip(columns, widths)]
    label_width = int(max(measure(label, font=font) for label, _ in rows)) + 2 * GAP
    top = (LINE + GAP if title else 0) + max(len(h) for h in headers) * LINE + GAP
    canvas = Image.new("RGB", (label_width + sum(w + GAP for w in widths) + GAP, top + sum(h + GAP for h in heights)),
                       "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((GAP, GAP // 2), title, fill="black", font=font)
    x = label_width
    for header, w in zip(headers, widths):
        for k, line in enumerate(header):
            draw.text((x, top - GAP - (len(header) - k) * LINE), line, fill="black", font=font)
        x += w + GAP
    y = top
    for (label, images), h in zip(rows, heights):
        draw.text((GAP, y + max(0, h // 2 - LINE // 2)), label, fill="black", font=font)
        x = label_width
        for image, w in zip(images, widths):
            if image is not None:
                canvas.paste(Image.fromarray(np.ascontiguousarray(image)), (x, y))
            x += w + GAP
        y += h + GAP
    return canvas


def write_grid(path: str | Path, rows: Sequence[Row], columns: Sequence[str], title: str | None = None) -> Path:
    """Write `labelled_grid` as a PNG (atomically)."""
    image = labelled_grid(rows, columns, title)
    return write_with(Path(path), lambda tmp: image.save(tmp, format="PNG", optimize=True))


def class_columns(num_classes: int, count: int) -> list[str]:
    """Column labels of a class-balanced set whose image i has class i mod num_classes: 'class 0', 'class 1', ..."""
    return [f"class {k}" for k in range(min(int(num_classes), int(count)))]
