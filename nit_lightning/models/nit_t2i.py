"""NiT-T2I: packed text-conditional diffusion transformer (SPEC §10, the paper's Appendix A), presets, `build_nit_t2i`.

Shares with NiT (models/nit.py) the patch embedding, time embedding, final layer, REPA projector, init rules, RoPE
metadata and input checks; differs in the condition (a PackedText of caption tokens instead of class labels, entering
through cross-attention) and in the block (models/t2i_blocks.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from nit_lightning.models.blocks import FinalLayer
from nit_lightning.models.nit import (
    PackedNetShape,
    PatchEmbed,
    TimestepEmbedder,
    check_packed_inputs,
    image_meta,
    initialize_packed_net,
    make_projector,
)
from nit_lightning.models.packed import PackedMeta
from nit_lightning.models.t2i_blocks import CaptionEmbedder, NiTT2IBlock
from nit_lightning.models.text import PackedText, TextMeta


@dataclass
class NiTT2IConfig(PackedNetShape):
    """Architecture of a NiT-T2I; `dataclasses.asdict` of it is what checkpoints store."""

    depth: int
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    in_channels: int = 32
    patch_size: int = 1
    text_dim: int = 1152  # width E of the text encoder's hidden states (Gemma3-1B-it: 1152)
    modulation_rank: int | None = 230  # adaLN LoRA D -> r -> 9D; None = full Linear(D, 9D)
    cross_qk_norm: bool = True  # LayerNorm over head_dim on cross-attention q (image) and k (caption)
    rope_layout: str = "rowcol"
    attn_backend: str = "auto"
    rope_theta: float = 10000.0
    rope_ntk_scale: float = 1.0
    rope_interp_scale: float = 1.0
    projector_dim: int | None = None  # REPA projector output (encoder feature dim); None = no projector
    projector_hidden: int = 2048

    def __post_init__(self) -> None:
        self.check_shared(("depth", "hidden_size", "num_heads", "in_channels", "patch_size", "text_dim"))
        if self.modulation_rank is not None and self.modulation_rank < 1:
            raise ValueError(f"modulation_rank must be >= 1 or None (full modulation), got {self.modulation_rank}")


def matching_modulation_rank(hidden_size: int, num_heads: int, cross_qk_norm: bool = True) -> int:
    """The LoRA rank r that brings a T2I block's parameter count closest to a C2I block's of the same width.

    A C2I block spends 6D² + 6D on its modulation; the T2I block adds cross-attention (q, kv, proj: 4D² + 4D, plus
    4·head_dim for qk-norm) and spends r(D + 1) + 9D(r + 1) = r(10D + 1) + 9D on its LoRA modulation, so
    r = round((2D² + 2D − 4·head_dim·qk − 9D) / (10D + 1)). D = 1152, 16 heads: 229.66 -> 230.
    """
    d, head_dim = hidden_size, hidden_size // num_heads
    budget = 2 * d * d + 2 * d - (4 * head_dim if cross_qk_norm else 0) - 9 * d
    return max(1, round(budget / (10 * d + 1)))


T2I_PRESETS: dict[str, dict] = {
    # The paper's 673M "matching the XL model": XL width and depth, Gemma3-1B-it's 1152-wide hidden states.
    "NiT-T2I": dict(depth=28, hidden_size=1152, num_heads=16, text_dim=1152, modulation_rank=230),
    "NiT-T2I-debug": dict(depth=2, hidden_size=64, num_heads=2, text_dim=32, modulation_rank=12),
}


def build_nit_t2i(name: str, **overrides) -> "NiTT2I":
    """A NiT-T2I from a preset name, with any NiTT2IConfig field overridden by keyword."""
    if name not in T2I_PRESETS:
        raise ValueError(f"unknown NiT-T2I preset {name!r}; valid: {sorted(T2I_PRESETS)}")
    fields = {f.name for f in dataclasses.fields(NiTT2IConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown NiTT2IConfig field(s) {unknown}; valid: {sorted(fields)}")
    return NiTT2I(NiTT2IConfig(**{**T2I_PRESETS[name], **overrides}))


@dataclass
class T2IMeta:
    """Everything the blocks need about a pack: the image side (as C2I) and the caption side of cross-attention."""

    image: PackedMeta
    text: TextMeta


class NiTT2I(nn.Module):
    """Packed NiT-T2I: forward(x (N, C·p·p), t (B,), text PackedText (M, E) + (B,), hw (B, 2)) -> velocity (N, C·p·p)."""

    conditioning = "text"  # what the condition is: a PackedText (NiT: "class", (B,) labels)

    def __init__(self, config: NiTT2IConfig) -> None:
        super().__init__()
        self.config = cfg = config
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.token_dim, d)
        self.t_embedder = TimestepEmbedder(d)
        self.text_embedder = CaptionEmbedder(cfg.text_dim, d)
        self.blocks = nn.ModuleList([NiTT2IBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(d, cfg.token_dim)
        self.projector = (
            make_projector(d, cfg.projector_hidden, cfg.projector_dim) if cfg.projector_dim is not None else None
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """NiT's rules (SPEC §1.5): xavier / zero bias, N(0, .02) t-MLP, zero modulation outputs and final linear."""
        initialize_packed_net(self)

    def null_text(self, num_images: int) -> PackedText:
        """The null caption (length 0) for `num_images` images: the unconditional branch of classifier-free guidance."""
        w = self.x_embedder.proj.weight
        return PackedText.null(num_images, self.config.text_dim, device=w.device, dtype=w.dtype)

    def build_meta(self, hw: torch.Tensor, num_tokens: int, text_lengths: torch.Tensor, num_text_tokens: int, *,
                   rope_interp_scale: float | None = None) -> T2IMeta:
        """Both sides' metadata with one host read (hw and the caption lengths together); reusable across sampler steps."""
        if hw.ndim != 2 or hw.shape[1] != 2:
            raise ValueError(f"hw must be (B, 2) token-grid sizes, got shape {tuple(hw.shape)}")
        b = hw.shape[0]
        host = torch.cat([hw.reshape(-1), text_lengths.to(device=hw.device, dtype=hw.dtype)]).tolist()
        hw_host = [host[2 * i: 2 * i + 2] for i in range(b)]
        image = image_meta(self, hw, num_tokens, rope_interp_scale=rope_interp_scale, hw_host=hw_host)
        text = TextMeta.build(text_lengths, num_text_tokens, image.seqlens_host, device=image.hw.device,
                              lengths_host=host[2 * b:])
        return T2IMeta(image, text)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: PackedText,
        hw: torch.Tensor,
        *,
        return_hidden_at: int | None = None,
        meta: T2IMeta | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Velocity (N, C·p·p); with return_hidden_at=k also the hidden state after block k (1-based)."""
        cfg = self.config
        check_packed_inputs(cfg, x, return_hidden_at)
        if not isinstance(text, PackedText):
            raise TypeError(f"NiT-T2I takes its captions as a PackedText (tokens + lengths), got {type(text).__name__}")
        if text.dim != cfg.text_dim:
            raise ValueError(f"caption tokens are {text.dim} wide but this net was built for text_dim={cfg.text_dim}; "
                             "use the text encoder it was trained with")
        if t.shape != (hw.shape[0],):
            raise ValueError(f"t {tuple(t.shape)} must be (B,) with B = {hw.shape[0]} (from hw)")
        if meta is None:
            meta = self.build_meta(hw, x.shape[0], text.lengths, text.tokens.shape[0])
        elif meta.image.num_tokens != x.shape[0] or meta.text.num_tokens != text.tokens.shape[0]:
            raise ValueError(f"meta was built for {meta.image.num_tokens} image and {meta.text.num_tokens} caption "
                             f"tokens but got {x.shape[0]} and {text.tokens.shape[0]}; rebuild it for this pack")
        return self.forward_packed(x, t, text.tokens, meta, return_hidden_at)

    def forward_packed(
        self, x: torch.Tensor, t: torch.Tensor, text_tokens: torch.Tensor, meta: T2IMeta,
        return_hidden_at: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Embeddings, blocks and final layer on a built T2IMeta: the device-only part of `forward`, no host sync."""
        x_ND = self.x_embedder(x)
        c_BD = self.t_embedder(t)  # the time embedding alone conditions adaLN; the caption enters by cross-attention
        text_MD = self.text_embedder(text_tokens.to(self.text_embedder.proj.weight.dtype))
        hidden = None
        for i, block in enumerate(self.blocks):
            x_ND = block(x_ND, c_BD, meta.image, text_MD, meta.text)
            if return_hidden_at == i + 1:
                hidden = x_ND
        v = self.final_layer(x_ND, c_BD, meta.image)
        return v if return_hidden_at is None else (v, hidden)
