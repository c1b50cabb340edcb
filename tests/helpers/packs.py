"""Packs as lists of sample indices (easier to assert on than the library's flat (indices, offsets) arrays)."""
from __future__ import annotations

import numpy as np

from nit_lightning.data.packing import lpfhp_flat


def as_lists(indices: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    flat, bounds = indices.tolist(), offsets.tolist()
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def lpfhp(lengths, max_tokens: int, max_per_pack: int | None = None, seed=None) -> list[list[int]]:
    """`lpfhp_flat` split into one list of indices per pack."""
    return as_lists(*lpfhp_flat(lengths, max_tokens, max_per_pack, seed))
