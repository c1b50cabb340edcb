"""A procedural class-conditional image folder at native resolutions: colour + shape family per class, noisy textures."""
from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nit_lightning.records import SettingsRecord, folder_lock, write_with
from nit_lightning.records.lock import LOCK_NAME

# Ten shape families; class k draws family k mod 10 in a hue that differs between the classes of one family.
FAMILIES = ("disc", "ring", "stripes", "bar", "cross", "checker", "triangle", "gradient", "diamond", "frame")
GOLDEN = 0.6180339887498949


@dataclass
class SynthSettings:
    """Everything that decides the bytes of the set (same settings -> same files)."""

    out: str
    num_images: int = 1000
    num_classes: int = 10
    min_side: int = 32
    max_side: int = 256
    seed: int = 0
    val_fraction: float = 0.0
    max_aspect: float = 3.0  # aspect ratios from 1:3 to 3:1
    snap_fraction: float = 0.5  # share of images whose sides are multiples of 8; the rest have free sides
    # Long side uniform in [max(min_long_side, min_side), max_side]: fewer tiny images, whose 4-token sides cannot hold
    # the thin parts of a shape (checker cells, stripes, cross arms). 0: from min_side (the short side stays ≥ min_side).
    min_long_side: int = 0

    def validate(self) -> None:
        if self.num_images < 1 or self.num_classes < 1:
            raise ValueError(f"need ≥ 1 image and ≥ 1 class, got {self.num_images} images, {self.num_classes} classes")
        if not 8 <= self.min_side <= self.max_side:
            raise ValueError(f"need 8 ≤ min_side ≤ max_side, got min_side {self.min_side}, max_side {self.max_side}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction {self.val_fraction} must be in [0, 1)")
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect {self.max_aspect} must be ≥ 1")
        if self.min_long_side > self.max_side:
            raise ValueError(f"min_long_side {self.min_long_side} must be ≤ max_side {self.max_side}")


def class_style(k: int) -> dict[str, Any]:
    """Family and base colour of class k: families cycle, hues step by the golden ratio so neighbours differ."""
    hue = (k * GOLDEN + 0.1) % 1.0
    return {"family": FAMILIES[k % len(FAMILIES)], "hue": round(hue, 6), "name": f"{FAMILIES[k % len(FAMILIES)]}-{k}"}


def sample_size(rng: np.random.Generator, s: SynthSettings) -> tuple[int, int]:
    """(H, W): long side uniform in [max(min_long_side, min), max], aspect ratio log-uniform in
    [1/max_aspect, max_aspect], clamped."""
    long_side = int(rng.integers(max(s.min_long_side, s.min_side), s.max_side + 1))
    ratio = math.exp(rng.uniform(-math.log(s.max_aspect), math.log(s.max_aspect)))
    short_side = int(round(long_side / max(ratio, 1.0 / ratio)))
    h, w = (long_side, short_side) if ratio >= 1.0 else (short_side, long_side)
    h, w = min(max(h, s.min_side), s.max_side), min(max(w, s.min_side), s.max_side)
    lo8, hi8 = 8 * math.ceil(s.min_side / 8), 8 * (s.max_side // 8)
    if rng.random() < s.snap_fraction and lo8 <= hi8:  # multiples of 8, kept inside [min, max]
        h, w = (min(max(8 * round(side / 8), lo8), hi8) for side in (h, w))
    return h, w


def _shape_mask(family: str, u: np.ndarray, v: np.ndarray, long_is_w: bool, phase: float) -> np.ndarray:
    """Soft mask in [0, 1] of one family on canvas coordinates u (across W), v (across H), both in [-1, 1]."""
    r = np.sqrt(u * u + v * v)
    along, across = (u, v) if long_is_w else (v, u)  # the long axis of the canvas
    if family == "disc":
        d = r - 0.6
    elif family == "ring":
        d = np.abs(r - 0.55) - 0.12
    elif family == "stripes":  # stripes across the long side, 5 periods over the canvas
        return (np.sin(along * 5 * math.pi + phase) > 0).astype(np.float32) * (r < 0.95)
    elif family == "bar":  # elongated along the canvas's long side
        d = np.maximum(np.abs(along) - 0.8, np.abs(across) - 0.18)
    elif family == "cross":
        d = np.minimum(np.maximum(np.abs(u) - 0.7, np.abs(v) - 0.15), np.maximum(np.abs(u) - 0.15, np.abs(v) - 0.7))
    elif family == "checker":
        # 4 x 4 cells over the canvas: at 6 x 6 the demo's small NiT drew them as noise at every size (shape acc 0 of
        # 5 samples per size); at 4 x 4 it draws a lattice at 128-192 px (docs/demo.md)
        cells = (np.floor((u + 1) * 2 + phase) + np.floor((v + 1) * 2)) % 2
        return cells.astype(np.float32) * (np.maximum(np.abs(u), np.abs(v)) < 0.8)
    elif family == "triangle":  # apex up, base at v = 0.6
        d = np.maximum(v - 0.6, np.abs(u) * 1.6 - (v + 0.7))
    elif family == "gradient":  # a left-to-right ramp, returned as a continuous mask
        return np.clip((u + 1) / 2, 0, 1).astype(np.float32)
    elif family == "diamond":
        d = np.abs(u) + np.abs(v) - 0.7
    elif family == "frame":
        box = np.maximum(np.abs(u), np.abs(v))
        d = np.abs(box - 0.6) - 0.1
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return np.clip(0.5 - d * 20, 0, 1).astype(np.float32)  # edge about 1/20 of the half-canvas wide


def canvas(hw: tuple[int, int], rng: np.random.Generator, size: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(U, V) shape coordinates of an H×W canvas, each (H, W): the object spans `size` of each side, jittered ±10% in
    scale and position (coordinates follow the canvas, so the object keeps its share of any aspect ratio)."""
    h, w = hw
    scale = rng.uniform(0.9, 1.1) * size
    cu, cv = rng.uniform(-0.1, 0.1, size=2)
    u = ((np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1 - cu) / scale
    v = ((np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1 - cv) / scale
    return np.meshgrid(u, v)  # (H, W) each


def family_mask(family: str, U: np.ndarray, V: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Soft (H, W) mask of one shape family on a canvas, with a random phase (stripes, checker)."""
    return _shape_mask(family, U, V, U.shape[1] >= U.shape[0], float(rng.uniform(0, 2 * math.pi)))


def render(k: int, hw: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """One (H, W, 3) uint8 image of class k: background + noise, the class shape in the class colour, fine texture."""
    style = class_style(k)
    U, V = canvas(hw, rng)
    mask = family_mask(style["family"], U, V, rng)
    hue = (style["hue"] + rng.uniform(-0.03, 0.03)) % 1.0
    fg = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0)), dtype=np.float32)
    return paint(mask, fg, U, V, rng)


def paint(mask: np.ndarray, fg: np.ndarray, U: np.ndarray, V: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8: a dark, shaded, random background, the masked object in `fg` (RGB in [0, 1]) with a fine
    texture, and per-pixel noise everywhere."""
    h, w = mask.shape
    bg = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.3), rng.uniform(0.05, 0.45)), dtype=np.float32)
    # Low-frequency background shading: a random plane, so that no two backgrounds are flat copies.
    gx, gy = rng.uniform(-0.15, 0.15, size=2)
    shade = (gx * U + gy * V)[..., None]
    image = bg + shade + mask[..., None] * (fg - bg)
    # Texture: a sinusoid with random frequency/orientation on the object, plus per-pixel noise everywhere.
    angle, freq = rng.uniform(0, math.pi), rng.uniform(4, 12)
    texture = 0.08 * np.sin(freq * math.pi * (U * math.cos(angle) + V * math.sin(angle)))
    image = image + (mask * texture)[..., None] + rng.normal(0, 0.04, size=(h, w, 3)).astype(np.float32)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


MANIFEST_NAME = "synth.json"  # written last: the set is complete
PARTIAL_NAME = "synth.partial.json"  # written first, removed at the end: a set being written (or cut short)


REMEDY = "its images would stay next to the new ones; use a new --out, or delete {out} first"


def check_output(out: Path, record: SettingsRecord) -> None:
    """An output folder must be new, empty, or a synth set of the same settings (whose rewrite gives the same files).

    A folder of other settings is refused rather than cleared: new images would lie next to stale ones (other sizes,
    other counts), and clearing would delete whatever a mistyped --out points at."""
    if not out.exists():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    for marker in (out / MANIFEST_NAME, out / PARTIAL_NAME):
        if marker.is_file():
            record.check(marker, what="a synth set", remedy=REMEDY.format(out=out), write=False)
            return
    if any(p.name != LOCK_NAME for p in out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no {MANIFEST_NAME}: synth writes only into a new or empty "
                         f"folder (or one of its own sets with the same settings)")


def write_synthetic(settings: SynthSettings) -> dict[str, Any]:
    """Write the set as an ImageNet-style folder (and train/val split), plus `synth.json`; returns the manifest."""
    settings.validate()
    s, out = settings, Path(settings.out)
    # Where the set lies is not what it is: --out is left out of the compared settings.
    record = SettingsRecord("synth", {k: v for k, v in asdict(s).items() if k != "out"})
    with folder_lock(out, "synth"):
        check_output(out, record)
        record.write(out / PARTIAL_NAME)
        return _write_images(s, out, record)


def _write_images(s: SynthSettings, out: Path, record: SettingsRecord) -> dict[str, Any]:
    width = max(3, len(str(s.num_classes - 1)))
    class_dirs = [f"c{k:0{width}d}-{class_style(k)['name']}" for k in range(s.num_classes)]
    num_val = int(round(s.num_images * s.val_fraction))
    split_rng = np.random.default_rng([s.seed, 0x5A1])
    val_ids = set(split_rng.permutation(s.num_images)[:num_val].tolist()) if num_val else set()
    counts = {"train": 0, "val": 0}
    for i in range(s.num_images):
        k = i % s.num_classes  # balanced classes
        rng = np.random.default_rng([s.seed, i])  # per-image stream: image i does not depend on N or on order
        hw = sample_size(rng, s)
        split = "val" if i in val_ids else "train"
        root = out / split if s.val_fraction > 0 else out
        folder = root / class_dirs[k]
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(render(k, hw, rng), "RGB")
        write_with(folder / f"{i:07d}.png", lambda tmp: image.save(tmp, format="PNG", compress_level=1))
        counts[split] += 1
    record.info = {"classes": [dict(class_style(k), index=k, folder=class_dirs[k]) for k in range(s.num_classes)],
                   "counts": counts if s.val_fraction > 0 else {"all": s.num_images}}
    record.write(out / MANIFEST_NAME)
    (out / PARTIAL_NAME).unlink()
    return record.as_dict()
