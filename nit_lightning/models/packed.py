"""`PackedMeta`: everything the blocks need about a pack, built once per forward (one host sync at most)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from nit_lightning.models.attention import equal_length_runs
from nit_lightning.models.rope import rope_cis, rope_sin_signed, rope_tables, token_positions


@dataclass
class PackedMeta:
    """Per-pack metadata threaded through all blocks; reusable across sampler steps for the same hw."""

    hw: torch.Tensor  # (B, 2) long, on the model's device
    seqlens: torch.Tensor  # (B,) long, h·w
    cu_seqlens: torch.Tensor  # (B+1,) int32, [0, cumsum(seqlens)]
    max_seqlen: int  # python int, for the varlen kernels
    seqlens_host: list[int]  # per-image lengths on the host, for the per-image SDPA loop
    instance_ids: torch.Tensor  # (N,) long, image index of every token
    rope_cos: torch.Tensor  # (N, head_dim) fp32
    rope_sin: torch.Tensor  # (N, head_dim) fp32
    rope_sin_signed: torch.Tensor  # (N, head_dim) fp32, [−s0, s0, −s1, s1, …] for the compiled qk-norm + RoPE
    rope_cis: torch.Tensor  # (N, head_dim/2) complex64 cos + i·sin per channel pair, for the eager qk-norm + RoPE
    cache: dict[str, Any] = field(default_factory=dict)  # backend-specific masks (flex BlockMask, dense mask)

    @property
    def num_tokens(self) -> int:
        return int(self.instance_ids.shape[0])

    @property
    def num_images(self) -> int:
        return len(self.seqlens_host)

    @classmethod
    def build(
        cls,
        hw: torch.Tensor,
        num_tokens: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        rope_layout: str = "rowcol",
        rope_theta: float = 10000.0,
        rope_ntk_scale: float = 1.0,
        rope_interp_scale: float = 1.0,
        hw_host: list[list[int]] | None = None,
    ) -> "PackedMeta":
        """Validate hw against the token count and build ids, cu_seqlens and RoPE tables (the one host sync).

        `hw_host`: hw already read to the host by the caller (NiTT2I reads hw and caption lengths in one sync)."""
        if hw.ndim != 2 or hw.shape[1] != 2:
            raise ValueError(f"hw must be (B, 2) token-grid sizes, got shape {tuple(hw.shape)}")
        if hw.dtype.is_floating_point:
            raise ValueError(f"hw must be an integer tensor (long), got {hw.dtype}")
        device = torch.device(device) if device is not None else hw.device
        # The single host read of the forward: hw is tiny (B×2); free when hw still lives on the CPU.
        hw_host = hw.tolist() if hw_host is None else hw_host
        if len(hw_host) == 0:
            raise ValueError("empty pack: hw has 0 images")
        bad = [(i, h, w) for i, (h, w) in enumerate(hw_host) if h < 1 or w < 1]
        if bad:
            raise ValueError(f"token grids must be at least 1×1; bad (index, h, w): {bad[:8]}")
        seqlens_host = [h * w for h, w in hw_host]
        if sum(seqlens_host) != num_tokens:
            raise ValueError(
                f"hw describes {sum(seqlens_host)} tokens (sum of h·w over {len(hw_host)} images) "
                f"but x has {num_tokens} rows; pass the hw that matches the packed x"
            )
        hw_d = hw.to(device=device, dtype=torch.long)
        seqlens = hw_d[:, 0] * hw_d[:, 1]
        cu = F.pad(torch.cumsum(seqlens, 0), (1, 0))  # (B+1,) long
        # output_size makes repeat_interleave sync-free on CUDA.
        ids = torch.repeat_interleave(torch.arange(len(hw_host), device=device), seqlens, output_size=num_tokens)
        pos = token_positions(hw_d, ids, cu[:-1], rope_layout)
        cos, sin = rope_tables(pos, head_dim, rope_theta, rope_ntk_scale, rope_interp_scale)
        return cls(
            hw=hw_d,
            seqlens=seqlens,
            cu_seqlens=cu.to(torch.int32),
            max_seqlen=max(seqlens_host),
            seqlens_host=seqlens_host,
            instance_ids=ids,
            rope_cos=cos,
            rope_sin=sin,
            rope_sin_signed=rope_sin_signed(sin),
            rope_cis=rope_cis(cos, sin),
            cache={"loop_runs": equal_length_runs(seqlens_host)},  # host-side, so compiled blocks only read the cache
        )

    def broadcast(self, per_image_BK: torch.Tensor) -> torch.Tensor:
        """(B, K) per-image values -> (N, K) per token, gathered by instance id (no host sync)."""
        return per_image_BK.index_select(0, self.instance_ids)
