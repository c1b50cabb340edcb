"""Axial 2D RoPE (SPEC §1.1): token positions per image, fp32 cos/sin tables, adjacent-pair rotation, qk-norm + RoPE."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROPE_LAYOUTS = ("rowcol", "reference")


def axis_frequencies(head_dim: int, theta: float = 10000.0, ntk_scale: float = 1.0) -> torch.Tensor:
    """ω_j = θ'^(−2j/d) for j < d/2, d = head_dim/2 channels per axis; fp32 (d/2,)."""
    if head_dim % 4:
        raise ValueError(f"axial 2D RoPE needs head_dim divisible by 4 (two axes × channel pairs), got {head_dim}")
    if ntk_scale < 1.0:
        raise ValueError(f"rope_ntk_scale must be >= 1 (s = test length / train length), got {ntk_scale}")
    d = head_dim // 2
    # NTK-aware base scaling θ' = θ·s^(d/(d−2)): the lowest frequency is stretched by s, the highest kept.
    base = theta * ntk_scale ** (d / (d - 2)) if ntk_scale != 1.0 else theta
    j = torch.arange(0, d, 2, dtype=torch.float64)  # 2j for j = 0 … d/2 − 1
    return (base ** (-j / d)).to(torch.float32)


def token_positions(
    hw: torch.Tensor, instance_ids: torch.Tensor, starts: torch.Tensor, layout: str = "rowcol"
) -> torch.Tensor:
    """(N, 2) fp32 (row-axis, col-axis) position of every packed token, from 0 in every image; no host sync."""
    if layout not in ROPE_LAYOUTS:
        raise ValueError(f"unknown rope_layout {layout!r}; valid: {list(ROPE_LAYOUTS)}")
    n = instance_ids.shape[0]
    k = torch.arange(n, device=instance_ids.device) - starts.to(torch.long)[instance_ids]  # index inside its image
    h = hw[:, 0].to(torch.long)[instance_ids]
    w = hw[:, 1].to(torch.long)[instance_ids]
    if layout == "rowcol":
        a, b = torch.div(k, w, rounding_mode="floor"), k % w  # row-major (row, col)
    else:
        # Reference quirk: a transposed meshgrid gives token k the pair (k mod h, k div h); its checkpoints need it.
        a, b = k % h, torch.div(k, h, rounding_mode="floor")
    return torch.stack([a, b], dim=-1).to(torch.float32)


def rope_tables(
    pos_N2: torch.Tensor,
    head_dim: int,
    theta: float = 10000.0,
    ntk_scale: float = 1.0,
    interp_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (N, head_dim) fp32: first half rotates by the row-axis position, second by the column-axis one."""
    if interp_scale <= 0:
        raise ValueError(f"rope_interp_scale must be > 0, got {interp_scale}")
    omega = axis_frequencies(head_dim, theta, ntk_scale).to(pos_N2.device)  # (Dh/4,)
    # Linear interpolation squeezes positions by s so a longer grid maps onto the trained range.
    pos = pos_N2.to(torch.float32) / interp_scale
    # Always autocast-free fp32: angle 40.7 rad in bf16 rounds to 40.75 and loses the sub-radian phase.
    with torch.autocast(device_type=pos.device.type, enabled=False):
        ang_row = pos[:, 0:1] * omega  # (N, Dh/4)
        ang_col = pos[:, 1:2] * omega
        # Each frequency drives one adjacent channel pair: [ω0, ω0, ω1, ω1, …] per axis.
        ang = torch.cat([ang_row.repeat_interleave(2, dim=-1), ang_col.repeat_interleave(2, dim=-1)], dim=-1)
        return ang.cos(), ang.sin()


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x_2m, x_2m+1) -> (−x_2m+1, x_2m) over the last dimension."""
    x2 = x.unflatten(-1, (-1, 2))
    return torch.stack([-x2[..., 1], x2[..., 0]], dim=-1).flatten(-2)


def apply_rope(x_NHD: torch.Tensor, cos_ND: torch.Tensor, sin_ND: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_pairs(x)·sin, computed in fp32, returned in x's dtype; tables broadcast over heads."""
    xf = x_NHD.float()
    cos, sin = cos_ND[:, None, :], sin_ND[:, None, :]  # (N, 1, Dh)
    return (xf * cos + rotate_pairs(xf) * sin).to(x_NHD.dtype)


def rope_sin_signed(sin_ND: torch.Tensor) -> torch.Tensor:
    """sin with the pair rotation's sign folded in, [−s0, s0, −s1, s1, …]: rope(x) = x·cos + swap_pairs(x)·sin_signed."""
    return (sin_ND.unflatten(-1, (-1, 2)) * sin_ND.new_tensor([-1.0, 1.0])).flatten(-2)


def rope_cis(cos_ND: torch.Tensor, sin_ND: torch.Tensor) -> torch.Tensor:
    """(N, head_dim/2) complex64 cos + i·sin, one entry per channel pair (both channels of a pair share one angle)."""
    return torch.complex(cos_ND[:, 0::2].float(), sin_ND[:, 0::2].float())


def swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x_2m, x_2m+1) -> (x_2m+1, x_2m) over the last dimension."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def _rope_real(x_NHD: torch.Tensor, cos_ND: torch.Tensor, sin_signed_ND: torch.Tensor) -> torch.Tensor:
    # The same products and sums as apply_rope: x·c + x'·(−s) is x·c + (−x')·s exactly.
    return x_NHD * cos_ND[:, None] + swap_pairs(x_NHD) * sin_signed_ND[:, None]


def _rope_complex(x_NHD: torch.Tensor, cis_NP: torch.Tensor) -> torch.Tensor:
    # (x0 + i·x1)(c + i·s) = (x0·c − x1·s) + i(x0·s + x1·c): the rotation of each pair, one elementwise kernel.
    xc = torch.view_as_complex(x_NHD.contiguous().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * cis_NP[:, None]).flatten(-2)


def head_layer_norm(x_NHD: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """qk-norm: LayerNorm over head_dim with affine, computed in at least fp32 (returned in that dtype)."""
    norm_dtype = torch.promote_types(x_NHD.dtype, torch.float32)
    # Affine parameters follow: bf16 weights (bf16-true, FSDP2 param_dtype) would not mix with an fp32 input.
    return F.layer_norm(x_NHD.to(norm_dtype), (x_NHD.shape[-1],), weight.to(norm_dtype), bias.to(norm_dtype), eps)


def qk_norm_rope(
    qkv_N3HD: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor,
    k_weight: torch.Tensor,
    k_bias: torch.Tensor,
    cos_ND: torch.Tensor,
    sin_signed_ND: torch.Tensor,
    cis_NP: torch.Tensor,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed qkv (N, 3, H, Dh) -> q, k, v (N, H, Dh) in qkv's dtype: qk-norm (LayerNorm over Dh) then 2D RoPE, in fp32.

    The norm runs in at least fp32 and the rotation in fp32 with fp32 tables (never bf16 angles); q and k are rounded to
    qkv's dtype once, at the end. Under torch.compile the rotation is real arithmetic, which Inductor fuses with the norm
    and the casts into one kernel; eager it is one complex multiply per channel pair (one kernel instead of four passes;
    Inductor has no complex codegen, hence the two bodies). Both compute the same products and sums.
    """
    q, k, v = qkv_N3HD.unbind(1)
    q = head_layer_norm(q, q_weight, q_bias, eps).float()
    k = head_layer_norm(k, k_weight, k_bias, eps).float()
    if torch.compiler.is_compiling():
        q, k = _rope_real(q, cos_ND, sin_signed_ND), _rope_real(k, cos_ND, sin_signed_ND)
    else:
        q, k = _rope_complex(q, cis_NP), _rope_complex(k, cis_NP)
    return q.to(v.dtype), k.to(v.dtype), v
