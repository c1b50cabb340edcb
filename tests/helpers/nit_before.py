"""Frozen copy of the NiT forward path as it was at commit 5b743b4 (before the issue-15 speed work): the reference.

Why a verbatim copy and not a golden-output file: the copy is exact on any pack, any config (patch 2, LoRA adaLN,
reference rope layout, return_hidden_at), in fp32 and float64, forward *and* backward, on whatever machine and torch the
tests run on. A golden file would pin one pack, one init RNG stream and one BLAS summation order (a different CPU or
torch build moves fp32 results by more than the 1e-6 we test), and gradients for every parameter of several configs
would make it large. The price is that this file must never be "fixed": it is what the network computed before.

It shares no code with `nit_lightning.models` except `NiTConfig` (a plain dataclass) and builds its submodules under
the same names, so `load_state_dict(new_net.state_dict(), strict=True)` also proves keys and shapes are unchanged.
Attention is the CPU path of that commit (`loop` backend: per-image SDPA, consecutive equal lengths batched).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# ---- rope.py at 5b743b4 -------------------------------------------------------------------------------------------


def axis_frequencies(head_dim: int, theta: float = 10000.0, ntk_scale: float = 1.0) -> torch.Tensor:
    d = head_dim // 2
    base = theta * ntk_scale ** (d / (d - 2)) if ntk_scale != 1.0 else theta
    j = torch.arange(0, d, 2, dtype=torch.float64)
    return (base ** (-j / d)).to(torch.float32)


def token_positions(hw, instance_ids, starts, layout="rowcol"):
    n = instance_ids.shape[0]
    k = torch.arange(n, device=instance_ids.device) - starts.to(torch.long)[instance_ids]
    h = hw[:, 0].to(torch.long)[instance_ids]
    w = hw[:, 1].to(torch.long)[instance_ids]
    if layout == "rowcol":
        a, b = torch.div(k, w, rounding_mode="floor"), k % w
    else:
        a, b = k % h, torch.div(k, h, rounding_mode="floor")
    return torch.stack([a, b], dim=-1).to(torch.float32)


def rope_tables(pos_N2, head_dim, theta=10000.0, ntk_scale=1.0, interp_scale=1.0):
    omega = axis_frequencies(head_dim, theta, ntk_scale).to(pos_N2.device)
    pos = pos_N2.to(torch.float32) / interp_scale
    with torch.autocast(device_type=pos.device.type, enabled=False):
        ang_row = pos[:, 0:1] * omega
        ang_col = pos[:, 1:2] * omega
        ang = torch.cat([ang_row.repeat_interleave(2, dim=-1), ang_col.repeat_interleave(2, dim=-1)], dim=-1)
        return ang.cos(), ang.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    x2 = x.unflatten(-1, (-1, 2))
    return torch.stack([-x2[..., 1], x2[..., 0]], dim=-1).flatten(-2)


def apply_rope(x_NHD, cos_ND, sin_ND):
    xf = x_NHD.float()
    cos, sin = cos_ND[:, None, :], sin_ND[:, None, :]
    return (xf * cos + rotate_pairs(xf) * sin).to(x_NHD.dtype)


# ---- packed.py at 5b743b4 (the fields the forward uses) -----------------------------------------------------------


@dataclass
class MetaBefore:
    instance_ids: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    seqlens_host: list[int]

    @classmethod
    def build(cls, hw, num_tokens, head_dim, *, device=None, rope_layout="rowcol", rope_theta=10000.0,
              rope_ntk_scale=1.0, rope_interp_scale=1.0):
        device = torch.device(device) if device is not None else hw.device
        hw_host = hw.tolist()
        seqlens_host = [h * w for h, w in hw_host]
        assert sum(seqlens_host) == num_tokens
        hw_d = hw.to(device=device, dtype=torch.long)
        seqlens = hw_d[:, 0] * hw_d[:, 1]
        cu = F.pad(torch.cumsum(seqlens, 0), (1, 0))
        ids = torch.repeat_interleave(torch.arange(len(hw_host), device=device), seqlens, output_size=num_tokens)
        pos = token_positions(hw_d, ids, cu[:-1], rope_layout)
        cos, sin = rope_tables(pos, head_dim, rope_theta, rope_ntk_scale, rope_interp_scale)
        return cls(instance_ids=ids, rope_cos=cos, rope_sin=sin, seqlens_host=seqlens_host)

    def broadcast(self, per_image_BK):
        return per_image_BK.index_select(0, self.instance_ids)


# ---- attention.py `loop` backend at 5b743b4 ------------------------------------------------------------------------


def _equal_length_runs(seqlens):
    runs = []
    for length in seqlens:
        if runs and runs[-1][1] == length:
            runs[-1] = (runs[-1][0] + 1, length)
        else:
            runs.append((1, length))
    return runs


def loop_attention(q, k, v, seqlens):
    runs = _equal_length_runs(seqlens)
    outs = []
    sizes = [count * length for count, length in runs]
    for (count, length), qi, ki, vi in zip(runs, q.split(sizes), k.split(sizes), v.split(sizes)):
        qb, kb, vb = (t.view(count, length, *t.shape[1:]).transpose(1, 2) for t in (qi, ki, vi))
        o = F.scaled_dot_product_attention(qb, kb, vb)
        outs.append(o.transpose(1, 2).reshape(count * length, *q.shape[1:]))
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0]


# ---- nit.py at 5b743b4 ----------------------------------------------------------------------------------------------


def timestep_features(t, dim=256, max_period=10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PatchEmbed(nn.Module):
    def __init__(self, token_dim, hidden):
        super().__init__()
        self.proj = nn.Linear(token_dim, hidden)

    def forward(self, x_NC):
        return self.proj(x_NC)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t_B):
        f = timestep_features(t_B, self.freq_dim)
        return self.mlp(f.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, hidden):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, y_B):
        return self.embedding_table(y_B)


class Attention(nn.Module):
    def __init__(self, hidden, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-5)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-5)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x_ND, meta):
        n = x_ND.shape[0]
        q, k, v = self.qkv(x_ND).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q = apply_rope(self.q_norm(q), meta.rope_cos, meta.rope_sin).to(v.dtype)
        k = apply_rope(self.k_norm(k), meta.rope_cos, meta.rope_sin).to(v.dtype)
        o = loop_attention(q, k, v, meta.seqlens_host)
        return self.proj(o.reshape(n, -1))


class Mlp(nn.Module):
    def __init__(self, hidden, mlp_hidden):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.fc2 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _modulation(hidden, chunks, rank):
    if rank is None:
        return nn.Sequential(nn.SiLU(), nn.Linear(hidden, chunks * hidden))
    return nn.Sequential(nn.SiLU(), nn.Linear(hidden, rank), nn.Linear(rank, chunks * hidden))


def _modulate(x_ND, shift_ND, scale_ND):
    return x_ND * (1 + scale_ND) + shift_ND


class NiTBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.adaLN_modulation = _modulation(d, 6, cfg.modulation_rank)

    def forward(self, x_ND, c_BD, meta):
        mod_N6D = meta.broadcast(self.adaLN_modulation(c_BD))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod_N6D.chunk(6, dim=-1)
        x_ND = x_ND + gate_msa * self.attn(_modulate(self.norm1(x_ND), shift_msa, scale_msa), meta)
        x_ND = x_ND + gate_mlp * self.mlp(_modulate(self.norm2(x_ND), shift_mlp, scale_mlp))
        return x_ND


class FinalLayer(nn.Module):
    def __init__(self, hidden, token_dim):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, token_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x_ND, c_BD, meta):
        shift, scale = meta.broadcast(self.adaLN_modulation(c_BD)).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x_ND), shift, scale))


def make_projector(hidden, proj_hidden, z_dim):
    return nn.Sequential(
        nn.Linear(hidden, proj_hidden), nn.SiLU(), nn.Linear(proj_hidden, proj_hidden), nn.SiLU(),
        nn.Linear(proj_hidden, z_dim),
    )


class NiTBefore(nn.Module):
    """The network of 5b743b4; load a new net's state dict into it (strict) and compare outputs and gradients."""

    def __init__(self, config) -> None:
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

    def build_meta(self, hw, num_tokens):
        cfg = self.config
        return MetaBefore.build(
            hw, num_tokens, cfg.head_dim, device=self.x_embedder.proj.weight.device, rope_layout=cfg.rope_layout,
            rope_theta=cfg.rope_theta, rope_ntk_scale=cfg.rope_ntk_scale, rope_interp_scale=cfg.rope_interp_scale,
        )

    def forward(self, x, t, y, hw, *, return_hidden_at=None):
        meta = self.build_meta(hw, x.shape[0])
        x_ND = self.x_embedder(x)
        c_BD = self.t_embedder(t) + self.y_embedder(y)
        hidden = None
        for i, block in enumerate(self.blocks):
            x_ND = block(x_ND, c_BD, meta)
            if return_hidden_at == i + 1:
                hidden = x_ND
        v = self.final_layer(x_ND, c_BD, meta)
        return v if return_hidden_at is None else (v, hidden)
