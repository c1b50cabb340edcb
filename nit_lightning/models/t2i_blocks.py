"""The NiT-T2I block (SPEC §10): packed self-attention exactly as C2I, cross-attention from each image's tokens to its
own caption's tokens, MLP; nine adaLN vectors per image from the time embedding, through a low-rank projection.

Everything but the cross-attention is models/blocks.py's (Attention, Mlp, the keep-dtype norms, the packed
modulate / gated residual, the LoRA modulation), so the two blocks cannot drift apart.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from nit_lightning.models.blocks import Attention, LayerNormKeepDtype, Mlp, _gated_residual, _modulate, _modulation
from nit_lightning.models.cross_attention import packed_cross_attention
from nit_lightning.models.packed import PackedMeta
from nit_lightning.models.rope import head_layer_norm
from nit_lightning.models.text import TextMeta

if TYPE_CHECKING:
    from nit_lightning.models.nit_t2i import NiTT2IConfig


class CaptionEmbedder(nn.Module):
    """Text-encoder hidden states (M, E) -> caption tokens (M, D): LayerNorm (affine) then Linear(E, D).

    The norm first because encoder widths and scales differ (Gemma's last hidden states carry channels far larger
    than the rest); its affine lets training pick the scale the projection sees.
    """

    def __init__(self, text_dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(text_dim, eps=1e-6)
        self.proj = nn.Linear(text_dim, hidden)

    def forward(self, text_ME: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(text_ME))


class CrossAttention(nn.Module):
    """q from image tokens, k and v from caption tokens -> qk-norm (optional, no RoPE) -> packed cross-attention -> proj.

    No RoPE on either side: image queries sit on a 2D grid and caption keys on a 1D sequence, so a relative rotation
    between them would measure nothing; word order is already in the encoder's hidden states.
    """

    def __init__(self, hidden: int, num_heads: int, backend: str, qk_norm: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.backend = num_heads, hidden // num_heads, backend
        self.q = nn.Linear(hidden, hidden)
        self.kv = nn.Linear(hidden, 2 * hidden)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-5) if qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-5) if qk_norm else None
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x_ND: torch.Tensor, text_MD: torch.Tensor, meta: PackedMeta, text_meta: TextMeta) -> torch.Tensor:
        n, m = x_ND.shape[0], text_MD.shape[0]
        q = self.q(x_ND).view(n, self.num_heads, self.head_dim)
        k, v = self.kv(text_MD).view(m, 2, self.num_heads, self.head_dim).unbind(1)
        if self.q_norm is not None:  # in fp32, rounded to v's dtype once (as the self-attention's qk-norm)
            q = head_layer_norm(q, self.q_norm.weight, self.q_norm.bias, self.q_norm.eps).to(v.dtype)
            k = head_layer_norm(k, self.k_norm.weight, self.k_norm.bias, self.k_norm.eps).to(v.dtype)
        o = packed_cross_attention(
            q, k, v, meta.cu_seqlens, text_meta.cu_seqlens, meta.max_seqlen, text_meta.max_seqlen, self.backend,
            meta.seqlens_host, text_meta.seqlens_host, cache=text_meta.cache,
        )
        return self.proj(o.reshape(n, -1))


class NiTT2IBlock(nn.Module):
    """x += g_sa·SelfAttn(mod(LN x)); x += g_ca·CrossAttn(mod(LN x), caption); x += g_ff·MLP(mod(LN x)).

    Modulation: SiLU -> Linear(D, r) -> Linear(r, 9D) of the per-image time embedding (biases kept), zero-initialised
    last layer, so every gate starts at 0 and the block starts as the identity.
    """

    def __init__(self, cfg: NiTT2IConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = LayerNormKeepDtype(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads, cfg.attn_backend)
        self.norm2 = LayerNormKeepDtype(d, elementwise_affine=False, eps=1e-6)
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.attn_backend, cfg.cross_qk_norm)
        self.norm3 = LayerNormKeepDtype(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.adaLN_modulation = _modulation(d, 9, cfg.modulation_rank)

    def forward(self, x_ND: torch.Tensor, c_BD: torch.Tensor, meta: PackedMeta, text_MD: torch.Tensor,
                text_meta: TextMeta) -> torch.Tensor:
        # Nine (B, D) vectors per image, each gathered to the image's tokens where it is used (packed adaLN).
        (shift_sa, scale_sa, gate_sa, shift_ca, scale_ca, gate_ca,
         shift_ff, scale_ff, gate_ff) = self.adaLN_modulation(c_BD).chunk(9, dim=-1)
        ids = meta.instance_ids
        sa_ND = self.attn(_modulate(self.norm1(x_ND), shift_sa, scale_sa, ids), meta)
        x_ND = _gated_residual(x_ND, gate_sa, sa_ND, ids)
        ca_ND = self.cross_attn(_modulate(self.norm2(x_ND), shift_ca, scale_ca, ids), text_MD, meta, text_meta)
        x_ND = _gated_residual(x_ND, gate_ca, ca_ND, ids)
        ff_ND = self.mlp(_modulate(self.norm3(x_ND), shift_ff, scale_ff, ids))
        return _gated_residual(x_ND, gate_ff, ff_ND, ids)
