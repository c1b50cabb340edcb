"""Classifier-free guidance with a guidance interval, wrapped around a packed `model_fn(x, t, y, hw) -> v` (SPEC §7)."""
from __future__ import annotations

from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def guidance_active(t_cur: float, cfg_scale: float, cfg_interval: tuple[float, float]) -> bool:
    """Guidance (and the null branch) runs only when scale ≠ 1 and lo ≤ t_cur ≤ hi (exact comparison, as the reference)."""
    lo, hi = cfg_interval
    return cfg_scale != 1.0 and lo <= t_cur <= hi


def time_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Times go to the model in fp32 at least: t = 0.97 in bf16 is 0.96875, a visible error in the time embedding."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


class GuidedModel:
    """v̂(x, t) = v_u + s·(v_c − v_u) inside [lo, hi], v_c outside; counts calls (NFE) and tokens sent to the model."""

    def __init__(
        self,
        model_fn: ModelFn,
        *,
        cfg_scale: float = 1.0,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        null_class: int | None = None,
        model_dtype: torch.dtype = torch.float32,
    ) -> None:
        lo, hi = float(cfg_interval[0]), float(cfg_interval[1])
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval ({lo}, {hi}) must satisfy 0 <= lo <= hi <= 1")
        if cfg_scale != 1.0 and null_class is None:
            raise ValueError(f"cfg_scale={cfg_scale} needs null_class (the label of the unconditional branch, net.null_class)")
        self.model_fn = model_fn
        self.cfg_scale = float(cfg_scale)
        self.cfg_interval = (lo, hi)
        self.null_class = null_class
        self.model_dtype = model_dtype
        self._doubled: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # y, hw, y2, hw2
        self.nfe = 0  # model calls
        self.tokens = 0  # tokens through the model, the doubled sequence counted twice

    def __call__(
        self, x_ND: torch.Tensor, t_cur: float, y_B: torch.Tensor, hw_B2: torch.Tensor, *, decide_at: float | None = None
    ) -> torch.Tensor:
        """Velocity at the scalar time t_cur for every image, in x's dtype; guidance on/off taken at `decide_at` or t_cur."""
        B = y_B.shape[0]
        t_type = time_dtype(self.model_dtype)
        x_in = x_ND.to(self.model_dtype)
        self.nfe += 1
        if guidance_active(t_cur if decide_at is None else decide_at, self.cfg_scale, self.cfg_interval):
            # One packed call holds both branches: tokens [x; x], labels [y; null], grids [hw; hw] (2N tokens).
            x2 = torch.cat([x_in, x_in], dim=0)
            y2, hw2 = self._double(y_B, hw_B2)
            t2 = torch.full((2 * B,), t_cur, dtype=t_type, device=x_ND.device)
            self.tokens += 2 * x_ND.shape[0]
            v2 = self.model_fn(x2, t2, y2, hw2).to(x_ND.dtype)
            v_c, v_u = v2.split(x_ND.shape[0], dim=0)
            return v_u + self.cfg_scale * (v_c - v_u)
        t = torch.full((B,), t_cur, dtype=t_type, device=x_ND.device)
        self.tokens += x_ND.shape[0]
        return self.model_fn(x_in, t, y_B, hw_B2).to(x_ND.dtype)

    def _double(self, y_B: torch.Tensor, hw_B2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[y; null] and [hw; hw], built once per pack: the same hw2 object lets the model_fn reuse its packed metadata."""
        d = self._doubled
        if d is None or d[0] is not y_B or d[1] is not hw_B2:
            y2 = torch.cat([y_B, torch.full_like(y_B, int(self.null_class))], dim=0)
            d = self._doubled = (y_B, hw_B2, y2, torch.cat([hw_B2, hw_B2], dim=0))
        return d[2], d[3]
