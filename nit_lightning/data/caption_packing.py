"""Caption tokens in the packing budget (NiT-T2I): a sample's packing cost = its image tokens + ceil(c × caption tokens).

Why a fraction: per block an image token costs ~28D² matmul FLOPs (qkv 6D², proj 2D², MLP 16D², cross-attention q and
proj 4D²) and a caption token 4D² (its k and v projections), so c = 4/28 = 1/7 charges a caption token what it costs
(models/flops.py has the exact count; the scores, 4·L_img·L_txt·D per image, are left out). With DC-AE f32 a 256² image
is 64 tokens and a Gemma caption up to 300: counted at 0, a pack could hold ~1.7× the compute `tokens_per_pack` plans.

`tokens_per_pack` then bounds that cost; the plan's `tokens` stay image tokens (what the loader checks each latent
against). c = 0 leaves every source's cost unset: the plans are exactly those of image tokens alone.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from nit_lightning.data.epochs import Source

log = logging.getLogger(__name__)

OPTION = "data.caption_token_cost"


def check_caption_token_cost(cost: float) -> float:
    """A finite cost ≥ 0 (0: image tokens only; 1/7 ≈ 0.143: what a caption token costs in a NiT-T2I block)."""
    cost = float(cost)
    if not 0.0 <= cost < float("inf"):
        raise ValueError(f"{OPTION}={cost} must be ≥ 0 (0: count image tokens only; 0.143: a caption token costs 1/7 "
                         "of an image token in a NiT-T2I block)")
    return cost


def caption_counts(index: dict[str, Any], path: Any) -> np.ndarray | None:
    """(n,) int64 caption tokens per sample from index.json's shards (aligned with `lengths`), None where not counted."""
    shards = index["shards"]
    if not shards or any("caption_tokens" not in shard for shard in shards):
        return None
    for shard in shards:
        if len(shard["caption_tokens"]) != len(shard["lengths"]):
            raise ValueError(f"source {path}: shard {shard['name']} has {len(shard['caption_tokens'])} caption_tokens "
                             f"for {len(shard['lengths'])} samples in index.json; re-run `prepare --reindex`")
    return np.array([n for shard in shards for n in shard["caption_tokens"]], dtype=np.int64)


def caption_cost(caption_tokens: np.ndarray, cost: float) -> np.ndarray:
    """ceil(cost × caption tokens), int64. Rounded to 9 decimals first: 0.1 × 30 is 3.0000000000000004 in floats,
    whose ceiling would charge 4."""
    return np.ceil(np.round(cost * caption_tokens.astype(np.float64), 9)).astype(np.int64)


def apply_caption_cost(sources: list[Source], cost: float, split: str = "train") -> None:
    """Set each source's packing cost; a cost > 0 on a source without caption token counts is one line."""
    if cost == 0.0:
        return
    for source in sources:
        if source.caption_tokens is None:
            raise ValueError(f"{OPTION}={cost} needs caption token counts, but {split} source {source.path} has none "
                             f"in its index.json: re-run `prepare --captions ... --text-encoder SPEC` (the model's "
                             f"text_encoder) into a new --output, or set {OPTION}: 0")
        source.caption_token_cost = cost
        source.cost = source.tokens + caption_cost(source.caption_tokens, cost)
    log.info("%s packs: a sample costs its image tokens + ceil(%g × its caption tokens) (%s); tokens_per_pack bounds "
             "that cost and packing efficiency counts it", split, cost, OPTION)
