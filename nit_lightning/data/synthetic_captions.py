"""Synthetic captioned images for NiT-T2I on a CPU: one object per image, its colour and shape independent.

Shapes are the ten families of data/synthetic.py (same masks, canvas-following, same background, texture and noise);
colours come from a named palette (RGB below), so a caption such as "a red triangle" or "a small blue ring" says all
that varies between objects. A reproducible set of colour × shape pairs is held out of training: a model that draws
"a purple ring" without ever seeing one has composed the colour with the shape. Sizes and aspect ratios are drawn as
in the class-conditional set (`sample_size`). Each image is `NNNNNNN.png` beside `NNNNNNN.txt` (its caption), and
`captions.jsonl` lists `{file, caption, colour, shape, small, split}` per image.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from nit_lightning.data.synthetic import (
    FAMILIES,
    MANIFEST_NAME,
    PARTIAL_NAME,
    canvas,
    check_output,
    family_mask,
    paint,
    sample_size,
)
from nit_lightning.records import SettingsRecord, folder_lock, write_text, write_with

# Named colours, sRGB 0-255: eight hues far apart (closest pair: orange / yellow, 83 apart) and bright enough to stand
# out from the dark backgrounds, so the colour of an object can be read back by the nearest palette entry.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (230, 220, 50),
    "green": (50, 180, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 80, 220),
    "purple": (150, 60, 200),
    "white": (235, 235, 235),
}
# What a caption calls each shape family ("stripes" is plural: "red stripes", no article).
SHAPE_NOUNS = {"disc": "disc", "ring": "ring", "stripes": "stripes", "bar": "bar", "cross": "cross",
               "checker": "checkerboard", "triangle": "triangle", "gradient": "gradient", "diamond": "diamond",
               "frame": "frame"}
SMALL_SIZE = 0.55  # a "small" object spans 0.55 of the canvas a plain one spans
CAPTIONS_NAME = "captions.jsonl"


@dataclass
class CaptionedSynthSettings:
    """Everything that decides the bytes of the set (same settings -> same files); sizes as `SynthSettings`."""

    out: str
    num_images: int = 1000
    min_side: int = 32
    max_side: int = 256
    seed: int = 0
    val_fraction: float = 0.0
    max_aspect: float = 3.0
    snap_fraction: float = 0.5
    min_long_side: int = 0
    colours: tuple[str, ...] = tuple(PALETTE)  # a subset of PALETTE, at least 6
    held_out_per_shape: int = 1  # colours held out of training per shape family
    held_out_seed: int = 0  # which pairs are held out; apart from `seed` so other image seeds keep the same pairs
    held_out_images: int = 0  # images of held-out pairs written to heldout/ (never to train/ or val/)
    small_fraction: float = 0.0  # share of objects drawn small and captioned "a small ..."
    colour_jitter: int = 12  # ± per RGB channel around the palette colour

    def validate(self) -> None:
        unknown = [c for c in self.colours if c not in PALETTE]
        if unknown or len(set(self.colours)) < 6:
            raise ValueError(f"colours {list(self.colours)} must be at least 6 distinct names of the palette "
                             f"{list(PALETTE)}")
        if not 0 <= self.held_out_per_shape < len(self.colours):
            raise ValueError(f"held_out_per_shape {self.held_out_per_shape} must be in 0..{len(self.colours) - 1}: "
                             "every shape needs a colour left to train on")
        if self.num_images < 1 or self.held_out_images < 0:
            raise ValueError(f"need num_images >= 1 and held_out_images >= 0, got {self.num_images}, "
                             f"{self.held_out_images}")
        if self.held_out_images and not self.held_out_per_shape:
            raise ValueError("held_out_images needs held-out pairs (held_out_per_shape >= 1)")
        if not 0.0 <= self.small_fraction <= 1.0 or not 0 <= self.colour_jitter <= 64:
            raise ValueError(f"small_fraction {self.small_fraction} must be in [0, 1] and colour_jitter "
                             f"{self.colour_jitter} in [0, 64]")
        if (not 8 <= self.min_side <= self.max_side or not 0.0 <= self.val_fraction < 1.0 or self.max_aspect < 1.0
                or self.min_long_side > self.max_side):
            raise ValueError(f"need 8 <= min_side <= max_side, val_fraction in [0, 1), max_aspect >= 1, min_long_side "
                             f"<= max_side; got {self.min_side}, {self.max_side}, {self.val_fraction}, "
                             f"{self.max_aspect}, {self.min_long_side}")


def held_out_pairs(colours: tuple[str, ...], per_shape: int = 1, seed: int = 0) -> list[tuple[str, str]]:
    """(colour, shape) pairs kept out of training: `per_shape` colours per family, spread over the palette by a
    seeded permutation so that every colour is held out about equally often and still trained with other shapes."""
    order = [colours[j] for j in np.random.default_rng([seed, 0x4E1D]).permutation(len(colours))]
    return [(order[(k * per_shape + j) % len(order)], family)
            for k, family in enumerate(FAMILIES) for j in range(per_shape)]


def caption(colour: str, family: str, small: bool = False) -> str:
    """'a red triangle', 'an orange ring', 'a small blue disc', 'red stripes'."""
    words = (["small"] if small else []) + [colour, SHAPE_NOUNS[family]]
    if family == "stripes":
        return " ".join(words)
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def possible_captions(colours: tuple[str, ...] = tuple(PALETTE)) -> list[str]:
    """Every caption the set can hold, held-out pairs included (a text encoder's vocabulary must cover them all)."""
    return [caption(c, f, small) for c in colours for f in FAMILIES for small in (False, True)]


def render_object(colour: str, family: str, small: bool, hw: tuple[int, int], rng: np.random.Generator,
                  jitter: int = 12) -> np.ndarray:
    """One (H, W, 3) uint8 image: the family's shape in the palette colour (± jitter) on a synthetic.py background."""
    U, V = canvas(hw, rng, SMALL_SIZE if small else 1.0)
    mask = family_mask(family, U, V, rng)
    rgb = np.array(PALETTE[colour], dtype=np.float32) + rng.uniform(-jitter, jitter, size=3)
    return paint(mask, np.clip(rgb, 0, 255) / 255, U, V, rng)


def write_captioned_synthetic(settings: CaptionedSynthSettings) -> dict[str, Any]:
    """Write the set (train/, val/, heldout/ when split, else flat), captions.jsonl and synth.json; returns the manifest."""
    settings.validate()
    s, out = settings, Path(settings.out)
    # Where the set lies is not what it is: --out is left out of the compared settings.
    record = SettingsRecord("synth-captioned", {k: (list(v) if isinstance(v, tuple) else v)
                                                for k, v in asdict(s).items() if k != "out"})
    with folder_lock(out, "synth"):
        check_output(out, record)
        record.write(out / PARTIAL_NAME)
        return _write_images(s, out, record)


def _write_images(s: CaptionedSynthSettings, out: Path, record: SettingsRecord) -> dict[str, Any]:
    held = held_out_pairs(s.colours, s.held_out_per_shape, s.held_out_seed)
    seen = [(c, f) for f in FAMILIES for c in s.colours if (c, f) not in set(held)]
    # Balanced pairs: image i takes pair i mod n of a seeded order, so every seen pair appears alike often.
    order = [seen[j] for j in np.random.default_rng([s.seed, 0xCA9]).permutation(len(seen))]
    num_val = int(round(s.num_images * s.val_fraction))
    val_ids = set(np.random.default_rng([s.seed, 0x5A1]).permutation(s.num_images)[:num_val].tolist())
    split_dirs = bool(num_val or s.held_out_images)
    jobs = [(i, order[i % len(order)], "val" if i in val_ids else "train") for i in range(s.num_images)]
    jobs += [(s.num_images + j, held[j % len(held)], "heldout") for j in range(s.held_out_images)]
    counts: dict[str, int] = {}
    lines = []
    for i, (colour, family), split in jobs:
        rng = np.random.default_rng([s.seed, i])  # per-image stream: image i does not depend on N or on order
        hw = sample_size(rng, s)
        small = bool(rng.random() < s.small_fraction)
        text = caption(colour, family, small)
        folder = out / split if split_dirs else out
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{i:07d}"
        image = Image.fromarray(render_object(colour, family, small, hw, rng, s.colour_jitter), "RGB")
        write_with(folder / f"{name}.png", lambda tmp: image.save(tmp, format="PNG", compress_level=1))
        write_text(folder / f"{name}.txt", text + "\n")
        lines.append({"file": (folder / f"{name}.png").relative_to(out).as_posix(), "caption": text,
                      "colour": colour, "shape": family, "small": small, "split": split})
        counts[split] = counts.get(split, 0) + 1
    write_text(out / CAPTIONS_NAME, "".join(json.dumps(line) + "\n" for line in lines))
    record.info = {"palette": {c: list(PALETTE[c]) for c in s.colours}, "shapes": list(FAMILIES),
                   "shape_nouns": SHAPE_NOUNS, "held_out": [list(p) for p in held], "seen": [list(p) for p in seen],
                   "counts": counts}
    record.write(out / MANIFEST_NAME)
    (out / PARTIAL_NAME).unlink()
    return record.as_dict()
