"""The optimiser of the recipe (SPEC §6): AdamW, fused on GPU, with an optional linear warm-up and cosine decay."""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Iterable, Mapping

import torch


def check_optim_args(lr: float, warmup_steps: int, lr_schedule: str, lr_min_ratio: float) -> None:
    """Refuse settings of the optimiser and its schedule that cannot be meant, when the module is built."""
    if not lr > 0:
        raise ValueError(f"model.lr={lr} must be > 0")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if lr_schedule not in ("constant", "cosine") or not 0.0 <= lr_min_ratio <= 1.0:
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine' and lr_min_ratio in [0, 1], got "
                         f"{lr_schedule!r}, {lr_min_ratio}")


def lr_factor(step: int, *, warmup: int, total: int, cosine: bool, floor: float) -> float:
    """Multiplier of the base lr at optimiser step `step`: linear warm-up, then 1 (constant) or a cosine to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    if not cosine:
        return 1.0
    progress = min(1.0, (step + 1 - warmup) / (total - warmup))  # the last step (total - 1) at the floor
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def adamw_with_schedule(params: Iterable[torch.nn.Parameter], hparams: Mapping[str, Any], max_steps: int, *,
                        fused: bool) -> Any:
    """AdamW from the module's hparams (lr never scaled by the GPU count); a step-wise LambdaLR when one is asked for.

    `fused` (CUDA): one kernel for the whole update, no host sync; the CPU keeps the foreach path.
    """
    optimizer = torch.optim.AdamW(list(params), lr=hparams["lr"], betas=tuple(hparams["betas"]),
                                  weight_decay=hparams["weight_decay"], eps=hparams["eps"], fused=fused or None)
    warmup = int(hparams["warmup_steps"])
    cosine = hparams.get("lr_schedule", "constant") == "cosine"
    if warmup == 0 and not cosine:
        return optimizer  # constant lr, as the paper
    if cosine and max_steps <= warmup:
        raise ValueError(f"lr_schedule 'cosine' needs trainer.max_steps > warmup_steps={warmup}, got {max_steps}")
    factor = partial(lr_factor, warmup=warmup, total=max_steps, cosine=cosine,
                     floor=float(hparams.get("lr_min_ratio", 0.0)))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def clip_unscaled_gradients(optimizer: Any, value: float, algorithm: str | None) -> None:
    """Clip the gradients of `optimizer`'s parameters as Lightning's precision plugin would, without its refusal.

    Lightning's AMP plugin refuses any clipping with a fused optimizer (it assumes the optimizer unscales fp16 gradients
    itself), so the fused AdamW on CUDA with `gradient_clip_val` failed at the first step. Without a gradient scaler
    (bf16-mixed, fp32) the gradients are unscaled, and clipping them here is exact: this is the plugin's own call.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, value)
    else:
        torch.nn.utils.clip_grad_norm_(params, value)
