"""Classifier-free guidance with a guidance interval, wrapped around a packed `model_fn(x, t, y, hw) -> v` (SPEC §7).

The condition `y` is either class labels (B,) (NiT; the unconditional branch is the null class) or a PackedText of
caption tokens (NiT-T2I; the unconditional branch is the null caption, length 0).
"""
from __future__ import annotations

from typing import Callable, Union

import torch

from nit_lightning.models.text import PackedText

Condition = Union[torch.Tensor, PackedText]
ModelFn = Callable[[torch.Tensor, torch.Tensor, Condition, torch.Tensor], torch.Tensor]


def num_conditioned(y: Condition) -> int:
    """How many images a condition describes: labels (B,) or B captions."""
    return y.num_images if isinstance(y, PackedText) else int(y.shape[0])


def unconditional(y: Condition, null_class: int | None) -> Condition:
    """The unconditional branch of `y`: the null class for labels, B null captions for a PackedText."""
    if isinstance(y, PackedText):
        return PackedText.null(y.num_images, y.dim, device=y.tokens.device, dtype=y.tokens.dtype)
    if null_class is None:
        raise ValueError("classifier-free guidance of class labels needs null_class (net.null_class)")
    return torch.full_like(y, int(null_class))


def concat_conditions(a: Condition, b: Condition) -> Condition:
    """[a; b] as one condition (the conditional and unconditional branches of one packed call)."""
    return a.cat(b) if isinstance(a, PackedText) else torch.cat([a, b], dim=0)


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
        text: bool = False,
    ) -> None:
        lo, hi = float(cfg_interval[0]), float(cfg_interval[1])
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval ({lo}, {hi}) must satisfy 0 <= lo <= hi <= 1")
        if cfg_scale != 1.0 and null_class is None and not text:
            raise ValueError(f"cfg_scale={cfg_scale} needs null_class (the label of the unconditional branch, net.null_class)")
        self.model_fn = model_fn
        self.cfg_scale = float(cfg_scale)
        self.cfg_interval = (lo, hi)
        self.null_class = null_class
        self.model_dtype = model_dtype
        self._doubled: tuple[Condition, torch.Tensor, Condition, torch.Tensor] | None = None  # y, hw, y2, hw2
        self.nfe = 0  # model calls
        self.tokens = 0  # tokens through the model, the doubled sequence counted twice

    def __call__(
        self, x_ND: torch.Tensor, t_cur: float, y_B: Condition, hw_B2: torch.Tensor, *, decide_at: float | None = None
    ) -> torch.Tensor:
        """Velocity at the scalar time t_cur for every image, in x's dtype; guidance on/off taken at `decide_at` or t_cur."""
        B = num_conditioned(y_B)
        t_type = time_dtype(self.model_dtype)
        x_in = x_ND.to(self.model_dtype)
        self.nfe += 1
        if guidance_active(t_cur if decide_at is None else decide_at, self.cfg_scale, self.cfg_interval):
            # One packed call holds both branches: tokens [x; x], conditions [y; null], grids [hw; hw] (2N tokens).
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

    def _double(self, y_B: Condition, hw_B2: torch.Tensor) -> tuple[Condition, torch.Tensor]:
        """[y; null] and [hw; hw], built once per pack: the same hw2 object lets the model_fn reuse its packed metadata."""
        d = self._doubled
        if d is None or d[0] is not y_B or d[1] is not hw_B2:
            y2 = concat_conditions(y_B, unconditional(y_B, self.null_class))
            d = self._doubled = (y_B, hw_B2, y2, torch.cat([hw_B2, hw_B2], dim=0))
        return d[2], d[3]
