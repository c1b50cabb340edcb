"""Does a text-to-image sample follow its prompt? Colour read back against the palette, shape by the demo's grayscale
shape classifier, both together; rates with standard errors, grouped by (seen / held-out pair) × (seen / unseen size).

Colour: the object is the most **salient** part of an image, salience = grey level (mean of R, G, B) + 2 · chroma (distance
from the grey axis). Every background of the set is dark and greyish (HSV value ≤ 0.45 ± 0.17 of shading, saturation
≤ 0.3), every palette colour is bright or strongly chromatic (white: grey level 235; green, the dimmest hue: grey 97,
chroma 102). The object's colour is the per-channel median of the most salient `fraction` of the pixels (at least
`min_pixels`), matched to the nearest palette entry **without the grey component** (each colour minus the mean of its
channels): the texture and the shading add the same amount to all three channels. Not a distance from a border colour:
the `gradient` family ramps across the whole canvas, so its border holds half the object's colour. On real rendered
images (all 8 × 10 pairs, plain and small, 32–128 px, 6400 images) it reads back the caption's colour every time;
salience by the largest channel alone took bright backgrounds for small green objects, a plain RGB distance took red
gradients for orange. 2.5 % of the pixels: a small bar fills ~3.5 % of its canvas.

Shape: the gray-std FeatureNet (evaluation/featurenet.py, luminance standardised per image), trained here on the
captioned training images with their shape as the label: colour cannot tell it the shape.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nit_lightning.data.synthetic import FAMILIES
from nit_lightning.data.synthetic_captions import CAPTIONS_NAME, PALETTE

COLOUR_FRACTION = 0.025  # share of the pixels, the brightest, whose median colour is the object's
MIN_PIXELS = 16  # ... and never fewer (a 32×32 image: 26 pixels at 2.5 %)
CHROMA_WEIGHT = 2.0  # salience = grey level + 2 · distance from the grey axis


def object_colour(image_HW3: np.ndarray, palette: dict[str, tuple[int, int, int]] | None = None,
                  fraction: float = COLOUR_FRACTION, min_pixels: int = MIN_PIXELS) -> str:
    """Name of the palette colour nearest to the median colour of the brightest pixels of one uint8 (H, W, 3) image."""
    palette = PALETTE if palette is None else palette
    if image_HW3.ndim != 3 or image_HW3.shape[2] != 3:
        raise ValueError(f"an image must be (H, W, 3), got shape {image_HW3.shape}")
    pixels = image_HW3.reshape(-1, 3).astype(np.float64)
    k = min(len(pixels), max(min_pixels, int(math.ceil(fraction * len(pixels)))))
    grey = pixels.mean(axis=1, keepdims=True)
    salience = grey[:, 0] + CHROMA_WEIGHT * np.linalg.norm(pixels - grey, axis=1)
    brightest = np.argpartition(salience, len(pixels) - k)[len(pixels) - k:]
    centre = np.median(pixels[brightest], axis=0)
    names = list(palette)
    rgbs = np.array([palette[n] for n in names], dtype=np.float64)
    # Compared without their grey component (the mean of the channels): texture and shading add the same to all three.
    diff = (rgbs - rgbs.mean(axis=1, keepdims=True)) - (centre - centre.mean())
    return names[int(np.argmin((diff ** 2).sum(axis=1)))]


@torch.no_grad()
def predict_shapes(images: Sequence[np.ndarray], classifier: Any, batch_size: int = 256) -> list[str]:
    """Shape family of each uint8 (H, W, 3) image by a gray-std classifier (a FeatureNet or its file); any sizes."""
    from nit_lightning.evaluation.classifiers import _as_classifier

    net = _as_classifier(classifier).eval()
    if net.config.input != "gray-std":
        raise ValueError(f"shape accuracy needs a classifier trained with input 'gray-std', got {net.config.input!r}")
    if net.config.num_classes != len(FAMILIES):
        raise ValueError(f"a shape classifier has {len(FAMILIES)} classes (FAMILIES), this one {net.config.num_classes}")
    classes = FAMILIES  # train_shape_classifier labels shape k as FAMILIES[k]
    out: list[str | None] = [None] * len(images)
    by_size: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):  # one batch per size, in index order
        by_size.setdefault(tuple(image.shape), []).append(i)
    for idx in by_size.values():
        for b0 in range(0, len(idx), batch_size):
            part = idx[b0:b0 + batch_size]
            x = torch.from_numpy(np.stack([images[i] for i in part])).permute(0, 3, 1, 2)
            for i, k in zip(part, net(x)["logits"].argmax(1).tolist()):
                out[i] = classes[k]
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Rate:
    """k successes of n: the rate and its binomial standard error √(p(1 − p)/n) (0 when p is 0 or 1)."""

    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def se(self) -> float:
        return standard_error(self.k, self.n)

    def as_dict(self) -> dict[str, float | int]:
        return {"rate": self.value, "se": self.se, "k": self.k, "n": self.n}

    def __str__(self) -> str:
        return f"{self.value:.3f} ± {self.se:.3f}"


def standard_error(k: int, n: int) -> float:
    """Binomial standard error of a rate k/n: √(p(1 − p)/n); nan for n = 0."""
    if n <= 0:
        return float("nan")
    p = k / n
    return math.sqrt(p * (1 - p) / n)


def score(images: Sequence[np.ndarray], truths: Sequence[dict[str, Any]], classifier: Any,
          palette: dict[str, tuple[int, int, int]] | None = None) -> dict[str, Any]:
    """Per group and overall: shape, colour and both-correct rates of generated images against their prompts.

    truths[i] = {"colour", "shape", "pair": "seen" | "held-out", "size": "seen" | "unseen"} (other keys ignored).
    Returns {"groups": {"<pair>/<size>": {"shape", "colour", "both": Rate dict}}, "per_image": [...]}."""
    if len(images) != len(truths):
        raise ValueError(f"{len(images)} images but {len(truths)} prompts")
    shapes = predict_shapes(images, classifier)
    colours = [object_colour(image, palette) for image in images]
    per_image = [{"shape_ok": s == t["shape"], "colour_ok": c == t["colour"], "shape": s, "colour": c}
                 for s, c, t in zip(shapes, colours, truths)]
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(truths):
        groups.setdefault(f"{t['pair']}/{t['size']}", []).append(i)
    table = {}
    for name in sorted(groups):
        idx = groups[name]
        rows = [per_image[i] for i in idx]
        table[name] = {
            "shape": Rate(sum(r["shape_ok"] for r in rows), len(rows)).as_dict(),
            "colour": Rate(sum(r["colour_ok"] for r in rows), len(rows)).as_dict(),
            "both": Rate(sum(r["shape_ok"] and r["colour_ok"] for r in rows), len(rows)).as_dict(),
        }
    return {"groups": table, "per_image": per_image}


def read_captions(root: str | Path, splits: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The lines of a captioned set's captions.jsonl (optionally only some splits), `file` made absolute."""
    root = Path(root)
    path = root / CAPTIONS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: make the set with write_captioned_synthetic")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = None if splits is None else set(splits)
    return [dict(line, file=str(root / line["file"])) for line in lines if keep is None or line["split"] in keep]


def train_shape_classifier(root: str | Path, out: str | Path, *, splits: Iterable[str] = ("train",), size: int = 64,
                           epochs: int = 6, seed: int = 0, **kwargs: Any) -> dict:
    """The demo's gray-std shape classifier on a captioned set's images, labelled by their shape family."""
    from nit_lightning.evaluation.classifiers import train_classifier

    lines = read_captions(root, splits)
    labels = [FAMILIES.index(line["shape"]) for line in lines]
    return train_classifier([line["file"] for line in lines], labels, list(FAMILIES), out, size=size, epochs=epochs,
                            seed=seed, input="gray-std", **kwargs)


def format_table(groups: dict[str, Any]) -> str:
    """A markdown table: group, n, shape, colour, both (rate ± standard error)."""
    rows = ["| pair / size | n | shape | colour | both |", "|---|---|---|---|---|"]
    for name, g in groups.items():
        cells = [f"{g[k]['rate']:.3f} ± {g[k]['se']:.3f}" for k in ("shape", "colour", "both")]
        rows.append(f"| {name} | {g['both']['n']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)
