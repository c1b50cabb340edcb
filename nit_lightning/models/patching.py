"""Latent grids <-> packed token rows. One token = one p×p patch of a (C, h, w) latent, channels ordered (C, p, p)."""
from __future__ import annotations

import torch


def token_grid(latent_hw: tuple[int, int], patch_size: int) -> tuple[int, int]:
    """Token-grid size of a latent of `latent_hw`; a side that is not a multiple of the patch is an error."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    if h % patch_size or w % patch_size:
        raise ValueError(f"latent {h}×{w} is not a multiple of patch size {patch_size}; resize or crop it first")
    return h // patch_size, w // patch_size


def patchify(latent_Chw: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, h, w) -> (h/p · w/p, C·p·p), tokens in row-major order of the token grid."""
    C, h, w = latent_Chw.shape
    gh, gw = token_grid((h, w), patch_size)
    p = patch_size
    x = latent_Chw.reshape(C, gh, p, gw, p).permute(1, 3, 0, 2, 4)  # (gh, gw, C, p, p)
    return x.reshape(gh * gw, C * p * p)


def unpatchify(tokens_LD: torch.Tensor, grid_hw: tuple[int, int], channels: int, patch_size: int) -> torch.Tensor:
    """(gh·gw, C·p·p) -> (C, gh·p, gw·p); the inverse of `patchify`."""
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    p = patch_size
    if tokens_LD.shape != (gh * gw, channels * p * p):
        raise ValueError(
            f"tokens of shape {tuple(tokens_LD.shape)} do not match grid {gh}×{gw} with C={channels}, p={p}"
        )
    x = tokens_LD.reshape(gh, gw, channels, p, p).permute(2, 0, 3, 1, 4)  # (C, gh, p, gw, p)
    return x.reshape(channels, gh * p, gw * p)


def pack_latents(latents: list[torch.Tensor], patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (C, h_i, w_i) -> packed tokens (N, C·p·p) and token grids hw (B, 2) long."""
    tokens = [patchify(z, patch_size) for z in latents]
    hw = torch.tensor([token_grid(z.shape[-2:], patch_size) for z in latents], dtype=torch.long)
    return torch.cat(tokens, dim=0), hw


def unpack_latents(x_ND: torch.Tensor, hw: torch.Tensor, channels: int, patch_size: int) -> list[torch.Tensor]:
    """Packed tokens (N, C·p·p) + grids (B, 2) -> list of (C, h_i·p, w_i·p) latents."""
    sizes = [int(h) * int(w) for h, w in hw.tolist()]
    if sum(sizes) != x_ND.shape[0]:
        raise ValueError(f"hw describes {sum(sizes)} tokens but x has {x_ND.shape[0]}")
    chunks = torch.split(x_ND, sizes, dim=0)
    return [unpatchify(c, (h, w), channels, patch_size) for c, (h, w) in zip(chunks, hw.tolist())]
