"""Synthetic token lengths of the NiT recipe mix (native ImageNet-like + fixed 256 + 512), for tests and benches."""
from __future__ import annotations

import numpy as np

FACTOR = 32  # DC-AE f32: one latent pixel (= one token at patch 1) per 32×32 image pixels
MAX_NATIVE_AREA = 2048 * 2048  # SPEC §4: images at or above 2048² are first rescaled to that area
FIXED_256_TOKENS = (256 // FACTOR) ** 2  # 8·8 = 64
FIXED_512_TOKENS = (512 // FACTOR) ** 2  # 16·16 = 256

# ImageNet train is dominated by 500-pixel long sides at 4:3 (500×375 -> 15×11 = 165 tokens) and 3:2 (500×333).
_ASPECTS = np.array([4 / 3, 3 / 2, 1.0, 5 / 4, 16 / 9])
_ASPECT_P = np.array([0.55, 0.17, 0.12, 0.05, 0.03])  # the other 8% draw a continuous ratio in [1, 2.5]


def imagenet_like_sizes(n: int, seed: int = 0) -> np.ndarray:
    """(n, 2) int image sizes (H, W) with an ImageNet-like mix of long sides, aspect ratios and orientations."""
    rng = np.random.default_rng([seed, 0x1A6E])
    # 75% have a long side of exactly 500 px; the rest spread log-normally around 400 px (80 px ... 5000 px).
    long_side = np.where(
        rng.random(n) < 0.75, 500.0, np.clip(np.exp(rng.normal(np.log(400.0), 0.6, n)), 80.0, 5000.0)
    )
    pick = rng.choice(len(_ASPECTS) + 1, size=n, p=np.append(_ASPECT_P, 1.0 - _ASPECT_P.sum()))
    aspect = np.where(pick < len(_ASPECTS), _ASPECTS[np.minimum(pick, len(_ASPECTS) - 1)], rng.uniform(1.0, 2.5, n))
    short_side = np.maximum(np.rint(long_side / aspect), 16.0)
    landscape = rng.random(n) < 0.78
    height = np.where(landscape, short_side, long_side)
    width = np.where(landscape, long_side, short_side)
    return np.stack([height, width], axis=1).astype(np.int64)


def native_grids(sizes_HW: np.ndarray, factor: int = FACTOR) -> np.ndarray:
    """(n, 2) latent sides (h, w) of the `native` rule (SPEC §4): area capped at 2048², sides floored to 32 (min 32)."""
    sizes = np.asarray(sizes_HW, dtype=np.float64).reshape(-1, 2)
    area = sizes[:, 0] * sizes[:, 1]
    scale = np.where(area >= MAX_NATIVE_AREA, np.sqrt(MAX_NATIVE_AREA / np.maximum(area, 1.0)), 1.0)
    return np.maximum(np.floor(sizes * scale[:, None] / factor).astype(np.int64), 1)


def native_tokens(sizes_HW: np.ndarray, factor: int = FACTOR) -> np.ndarray:
    """Token counts h·w of the `native` rule; ≤ 64·64 = 4096 by the area cap."""
    grids = native_grids(sizes_HW, factor)
    return grids[:, 0] * grids[:, 1]


def recipe_grids(n: int, seed: int = 0, mixture: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """(n, 2) latent grids mixed native : fixed-256 (8×8) : fixed-512 (16×16) in the ratio `mixture`, shuffled."""
    if n < 0:
        raise ValueError(f"n={n} must be ≥ 0")
    weights = np.asarray(mixture, dtype=np.float64)
    if weights.shape != (3,) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"mixture {mixture} must be three non-negative weights (native, fixed-256, fixed-512)")
    counts = np.floor(weights / weights.sum() * n).astype(np.int64)
    counts[np.argmax(weights)] += n - counts.sum()  # rounding remainder to the largest part: exactly n
    rng = np.random.default_rng([seed, 0x9ACC])
    side_256, side_512 = 256 // FACTOR, 512 // FACTOR
    parts = [
        native_grids(imagenet_like_sizes(int(counts[0]), seed)),
        np.full((int(counts[1]), 2), side_256, dtype=np.int64),
        np.full((int(counts[2]), 2), side_512, dtype=np.int64),
    ]
    return np.concatenate(parts)[rng.permutation(n)]


def recipe_lengths(n: int, seed: int = 0, mixture: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """n token lengths h·w of `recipe_grids` (the recipe: equal thirds native, 64, 256 tokens), shuffled."""
    grids = recipe_grids(n, seed, mixture)
    return grids[:, 0] * grids[:, 1]
