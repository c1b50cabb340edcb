"""NiT: packed class-conditional diffusion transformer (SPEC §1), its size presets and `build_nit`."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from nit_lightning.models.attention import BACKENDS
from nit_lightning.models.blocks import FinalLayer, NiTBlock
from nit_lightning.models.packed import PackedMeta
from nit_lightning.models.rope import ROPE_LAYOUTS


class PackedNetShape:
    """What every packed NiT config (class- or text-conditional) shares: head and token widths and their checks."""

    depth: int
    hidden_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    rope_layout: str
    attn_backend: str

    def check_shared(self, positive: tuple[str, ...]) -> None:
        """Heads divide D, head_dim fits axial 2D RoPE, known layout and backend, the `positive` fields >= 1."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be divisible by 4 for axial 2D RoPE")
        if self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"rope_layout {self.rope_layout!r} unknown; valid: {list(ROPE_LAYOUTS)}")
        if self.attn_backend not in (*BACKENDS, "auto"):
            raise ValueError(f"attn_backend {self.attn_backend!r} unknown; valid: {['auto', *BACKENDS]}")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def token_dim(self) -> int:
        """C·p·p: width of one packed input/output token."""
        return self.in_channels * self.patch_size**2


@dataclass
class NiTConfig(PackedNetShape):
    """Architecture of a NiT; `dataclasses.asdict` of it is what checkpoints store."""

    depth: int
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    in_channels: int = 32
    patch_size: int = 1
    num_classes: int = 1000
    rope_layout: str = "rowcol"  # "reference" reproduces the official checkpoints' transposed grid (SPEC §1.1)
    attn_backend: str = "auto"
    modulation_rank: int | None = None  # XXL: adaLN as LoRA D -> rank -> 6D, no nonlinearity
    rope_theta: float = 10000.0
    rope_ntk_scale: float = 1.0  # NTK-aware base scaling, s = test / train length; 1 = off
    rope_interp_scale: float = 1.0  # linear position interpolation, positions / s; 1 = off
    projector_dim: int | None = None  # REPA projector output (encoder feature dim); None = no projector
    projector_hidden: int = 2048

    def __post_init__(self) -> None:
        self.check_shared(("depth", "hidden_size", "num_heads", "in_channels", "patch_size", "num_classes"))


PRESETS: dict[str, dict] = {
    "NiT-S": dict(depth=12, hidden_size=384, num_heads=6),
    "NiT-B": dict(depth=12, hidden_size=768, num_heads=12),
    "NiT-L": dict(depth=24, hidden_size=1024, num_heads=16),
    "NiT-XL": dict(depth=28, hidden_size=1152, num_heads=16),
    "NiT-XXL": dict(depth=40, hidden_size=1536, num_heads=24, modulation_rank=512),
    "NiT-debug": dict(depth=2, hidden_size=64, num_heads=2),
}


def build_nit(name: str, **overrides) -> "NiT":
    """A NiT from a preset name, with any NiTConfig field overridden by keyword."""
    if name not in PRESETS:
        raise ValueError(f"unknown NiT preset {name!r}; valid: {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(NiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown NiTConfig field(s) {unknown}; valid: {sorted(fields)}")
    return NiT(NiTConfig(**{**PRESETS[name], **overrides}))


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) raw t in [0, 1] -> (B, dim) sinusoidal features, order [cos, sin], fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PatchEmbed(nn.Module):
    """Linear(C·p·p -> D) per token; the official 1×1 conv with its kernel flattened."""

    def __init__(self, token_dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(token_dim, hidden)

    def forward(self, x_NC: torch.Tensor) -> torch.Tensor:
        return self.proj(x_NC)


class TimestepEmbedder(nn.Module):
    """256 sinusoidal features -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        f = timestep_features(t_B, self.freq_dim)
        return self.mlp(f.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Table of num_classes + 1 rows; the last row is the null class for CFG (dropout lives in the training step)."""

    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y_B: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y_B)


def make_projector(hidden: int, proj_hidden: int, z_dim: int) -> nn.Sequential:
    """REPA projector Linear(D, 2048) -> SiLU -> Linear(2048, 2048) -> SiLU -> Linear(2048, z_dim) (SPEC §3)."""
    return nn.Sequential(
        nn.Linear(hidden, proj_hidden), nn.SiLU(), nn.Linear(proj_hidden, proj_hidden), nn.SiLU(),
        nn.Linear(proj_hidden, z_dim),
    )


def initialize_packed_net(net: nn.Module, tables: tuple[torch.Tensor, ...] = ()) -> None:
    """Init rules every packed NiT shares (SPEC §1.5), in one RNG order: xavier-uniform Linear weights and zero biases,
    N(0, .02) for `tables` (the label table) and both t-MLP weights, then zeros for every block's last modulation
    Linear, the final modulation and the final Linear, so an untrained net predicts exactly 0."""
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias) if m.bias is not None else None
    for table in tables:
        nn.init.normal_(table, std=0.02)
    nn.init.normal_(net.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(net.t_embedder.mlp[2].weight, std=0.02)
    for block in net.blocks:
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)
    nn.init.zeros_(net.final_layer.adaLN_modulation[-1].weight)
    nn.init.zeros_(net.final_layer.adaLN_modulation[-1].bias)
    nn.init.zeros_(net.final_layer.linear.weight)
    nn.init.zeros_(net.final_layer.linear.bias)


def check_packed_inputs(cfg: PackedNetShape, x: torch.Tensor, return_hidden_at: int | None) -> None:
    """x is packed (N, C·p·p) for this config; return_hidden_at names a block (1-based)."""
    if x.ndim != 2 or x.shape[1] != cfg.token_dim:
        raise ValueError(
            f"x must be packed (N, C·p·p) = (N, {cfg.token_dim}) for in_channels={cfg.in_channels}, "
            f"patch_size={cfg.patch_size}; got {tuple(x.shape)}"
        )
    if return_hidden_at is not None and not 1 <= return_hidden_at <= cfg.depth:
        raise ValueError(f"return_hidden_at must be in 1..{cfg.depth} (block k, 1-based), got {return_hidden_at}")


def image_meta(net: nn.Module, hw: torch.Tensor, num_tokens: int, *, rope_interp_scale: float | None = None,
               hw_host: list[list[int]] | None = None) -> PackedMeta:
    """PackedMeta for a packed net's RoPE settings (its `config`), on the device of its patch embedding."""
    cfg = net.config
    return PackedMeta.build(
        hw, num_tokens, cfg.head_dim, device=net.x_embedder.proj.weight.device, rope_layout=cfg.rope_layout,
        rope_theta=cfg.rope_theta, rope_ntk_scale=cfg.rope_ntk_scale,
        rope_interp_scale=cfg.rope_interp_scale if rope_interp_scale is None else rope_interp_scale, hw_host=hw_host,
    )


class NiT(nn.Module):
    """Packed NiT: forward(x (N, C·p·p), t (B,), y (B,), hw (B, 2)) -> velocity (N, C·p·p)."""

    conditioning = "class"  # what `y` is: (B,) class labels (NiTT2I: "text", a PackedText)

    def __init__(self, config: NiTConfig) -> None:
        super().__init__()
        self.config = cfg = config
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.token_dim, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d)
        self.blocks = nn.ModuleList([NiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(d, cfg.token_dim)
        self.projector = (
            make_projector(d, cfg.projector_hidden, cfg.projector_dim) if cfg.projector_dim is not None else None
        )
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def initialize_weights(self) -> None:
        """SPEC §1.5: xavier Linear / zero bias, N(0, .02) label table and t-MLP, zero adaLN outputs and final linear."""
        initialize_packed_net(self, tables=(self.y_embedder.embedding_table.weight,))

    def build_meta(self, hw: torch.Tensor, num_tokens: int, *, rope_interp_scale: float | None = None) -> PackedMeta:
        """PackedMeta for this net's RoPE settings, on its device; reuse it across sampler steps with the same hw.

        `rope_interp_scale` overrides the config's for this pack (a sampler interpolating positions per image size).
        """
        return image_meta(self, hw, num_tokens, rope_interp_scale=rope_interp_scale)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        hw: torch.Tensor,
        *,
        return_hidden_at: int | None = None,
        meta: PackedMeta | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Velocity (N, C·p·p); with return_hidden_at=k also the hidden state after block k (1-based)."""
        check_packed_inputs(self.config, x, return_hidden_at)
        if t.shape != (hw.shape[0],) or y.shape != (hw.shape[0],):
            raise ValueError(f"t {tuple(t.shape)} and y {tuple(y.shape)} must be (B,) with B = {hw.shape[0]} (from hw)")
        if meta is None:
            meta = self.build_meta(hw, x.shape[0])
        elif meta.num_tokens != x.shape[0]:
            raise ValueError(f"meta was built for {meta.num_tokens} tokens but x has {x.shape[0]}; rebuild it for this hw")
        return self.forward_packed(x, t, y, meta, return_hidden_at)

    def forward_packed(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, meta: PackedMeta, return_hidden_at: int | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Embeddings, blocks and final layer on a built PackedMeta: the device-only part of `forward`, no host sync.

        Compile mode "model" compiles this method (training/compile.py): one graph over all blocks, while the metadata
        (one host read of hw) stays outside it.
        """
        x_ND = self.x_embedder(x)
        c_BD = self.t_embedder(t) + self.y_embedder(y)
        hidden = None
        for i, block in enumerate(self.blocks):
            x_ND = block(x_ND, c_BD, meta)
            if return_hidden_at == i + 1:
                hidden = x_ND
        v = self.final_layer(x_ND, c_BD, meta)
        return v if return_hidden_at is None else (v, hidden)
