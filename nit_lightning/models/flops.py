"""FLOP counts of a NiT or NiT-T2I forward/training step from its architecture (matmul = 2·m·n·k; attention per image;
cross-attention per image against its own caption)."""
from __future__ import annotations

from typing import Sequence

import torch

from nit_lightning.models.nit import NiTConfig


def _lengths(seqlens: Sequence[int] | torch.Tensor) -> list[int]:
    lengths = seqlens.tolist() if isinstance(seqlens, torch.Tensor) else [int(s) for s in seqlens]
    if not lengths or min(lengths) < 1:
        raise ValueError(f"seqlens must be a non-empty list of positive token counts, got {lengths[:8]}")
    return lengths


def forward_flops(config: NiTConfig, seqlens: Sequence[int] | torch.Tensor, *, with_projector: bool = False,
                  text_lengths: Sequence[int] | torch.Tensor | None = None) -> int:
    """FLOPs of one forward over a pack with per-image token counts `seqlens` (dense matmuls only); for a NiT-T2I
    config (it has `text_dim`) also the caption tokens per image `text_lengths` (0 = null caption)."""
    lengths = _lengths(seqlens)
    text = hasattr(config, "text_dim")
    if text and (text_lengths is None or len(text_lengths) != len(lengths)):
        raise ValueError("a NiT-T2I forward's FLOPs need the caption length of every image (text_lengths)")
    n, b = sum(lengths), len(lengths)
    d, c = config.hidden_size, config.token_dim
    mlp = int(d * config.mlp_ratio)
    # Per token per block: qkv D·3D + proj D·D + fc1 D·M + fc2 M·D, ×2 for multiply-add.
    per_token_block = 2 * (3 * d * d + d * d + 2 * d * mlp)
    # Attention per image of length L: scores L·L·D and values L·L·D, ×2 each; each image only sees itself.
    attn_block = sum(4 * length * length * d for length in lengths)
    # Modulation runs on the B image vectors (packed adaLN), not on the N tokens.
    r = config.modulation_rank
    chunks = 9 if text else 6  # shift, scale, gate per sub-layer: self-attention, (cross-attention,) MLP
    mod_block = 2 * b * (d * chunks * d if r is None else d * r + r * chunks * d)
    blocks = config.depth * (n * per_token_block + attn_block + mod_block)
    if text:
        captions = [int(v) for v in (text_lengths.tolist() if isinstance(text_lengths, torch.Tensor) else text_lengths)]
        m = sum(captions)
        # Per block: q and proj on image tokens (2·D²), k and v on caption tokens (2·D²), scores and values per image.
        cross = 2 * n * 2 * d * d + 2 * m * 2 * d * d + sum(4 * li * ti * d for li, ti in zip(lengths, captions))
        blocks += config.depth * cross + 2 * m * config.text_dim * d  # + the caption embedder, once
    embed = 2 * n * c * d + 2 * b * (256 * d + d * d)  # patch embed per token; timestep MLP per image
    final = 2 * n * d * c + 2 * b * d * 2 * d
    total = blocks + embed + final
    if with_projector and config.projector_dim is not None:
        h = config.projector_hidden
        total += 2 * n * (d * h + h * h + h * config.projector_dim)
    return int(total)


def training_flops(config: NiTConfig, seqlens: Sequence[int] | torch.Tensor, *, with_projector: bool = False,
                   text_lengths: Sequence[int] | torch.Tensor | None = None) -> int:
    """Forward + backward ≈ 3× forward (backward computes grads of inputs and of weights: 2× forward)."""
    return 3 * forward_flops(config, seqlens, with_projector=with_projector, text_lengths=text_lengths)


def training_flops_per_token(config: NiTConfig, seqlens: Sequence[int] | torch.Tensor) -> float:
    """Training FLOPs divided by the pack's token count: multiply by tokens/s for achieved FLOP/s (MFU)."""
    lengths = _lengths(seqlens)
    return training_flops(config, lengths) / sum(lengths)
