"""Flow-matching objective (SPEC §3): linear path, logit-normal per-image times, MSE + direction (+ REPA) loss."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

REDUCTIONS = ("token", "image")


@dataclass
class LossOutput:
    """Scalar loss, its reduced parts (mse, direction, repa, nonfinite) and the per-image times used."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    t: torch.Tensor | None = None  # (B,)
    per_image: torch.Tensor | None = None  # (B,) detached: each image's weighted loss, mean over its own tokens


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but the data is on {device}; pass torch.Generator(device={str(device)!r})"
        )


def sample_times(
    B: int, generator: torch.Generator | None, device: torch.device | str, P_mean: float = 0.0, P_std: float = 1.0
) -> torch.Tensor:
    """(B,) logit-normal times t = sigmoid(n), n ~ N(P_mean, P_std²), drawn on `device` from `generator`."""
    device = torch.device(device)
    _check_generator(generator, device)
    n = torch.randn(B, generator=generator, device=device, dtype=torch.float32)
    return torch.sigmoid(n * P_std + P_mean)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t_tokens: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − t)·x0 + t·ε with t per token, (N,) or (N, 1); t = 0 is data, t = 1 noise."""
    t = t_tokens.reshape(-1, 1).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def direction_per_token(v_hat_ND: torch.Tensor, v_ND: torch.Tensor, patch_size: int = 1) -> torch.Tensor:
    """(N,) 1 − cos(v̂, v) over the C channels at each of a token's p×p sub-positions, averaged over them.

    Tokens hold (C, p, p) (models/patching.py), so for p > 1 a token of D = C·p·p values is p² latent pixels of C
    channels each: the official code takes the cosine per latent pixel, not over the whole C·p·p token. p = 1 is one
    pixel per token and keeps the plain cosine over the last dim (bitwise the same as before p was considered).
    """
    if patch_size == 1:
        return 1 - F.cosine_similarity(v_hat_ND, v_ND, dim=-1)
    N, D = v_hat_ND.shape
    if D % (patch_size * patch_size):
        raise ValueError(f"tokens of {D} values are not C·p·p for patch size {patch_size}")
    cos_NP = F.cosine_similarity(v_hat_ND.reshape(N, -1, patch_size * patch_size),
                                 v_ND.reshape(N, -1, patch_size * patch_size), dim=1)  # (N, p·p): over C
    return 1 - cos_NP.mean(dim=-1)


def _reduce(per_token_N: torch.Tensor, ids_N: torch.Tensor, seqlens_B: torch.Tensor, reduction: str) -> torch.Tensor:
    """Mean over all tokens ("token") or mean per image then over images ("image")."""
    if reduction == "token":
        return per_token_N.mean()
    sums = torch.zeros(seqlens_B.shape[0], dtype=per_token_N.dtype, device=per_token_N.device)
    sums = sums.index_add(0, ids_N, per_token_N)
    return (sums / seqlens_B.to(per_token_N.dtype)).mean()


class FlowMatchingLoss:
    """Callable loss; takes the net (any `net(x, t, y, hw, return_hidden_at=k)`), does not own it.

    `patch_size` must be the net's (tokens of C·p·p values): the direction term is a cosine per latent pixel.
    """

    def __init__(
        self,
        P_mean: float = 0.0,
        P_std: float = 1.0,
        direction_weight: float = 1.0,
        reduction: str = "token",
        repa_weight: float = 0.0,
        repa_layer: int | None = None,
        on_nonfinite: str = "raise",
        patch_size: int = 1,
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction {reduction!r} unknown; valid: {list(REDUCTIONS)}")
        if on_nonfinite not in ("raise", "report"):
            raise ValueError(f"on_nonfinite {on_nonfinite!r} unknown; valid: ['raise', 'report']")
        if P_std <= 0:
            raise ValueError(f"P_std must be > 0, got {P_std}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        if repa_weight > 0 and (repa_layer is None or repa_layer < 1):
            raise ValueError(f"repa_weight {repa_weight} > 0 needs repa_layer >= 1 (block k, 1-based), got {repa_layer}")
        self.P_mean, self.P_std = P_mean, P_std
        self.direction_weight, self.reduction = direction_weight, reduction
        self.repa_weight, self.repa_layer, self.on_nonfinite = repa_weight, repa_layer, on_nonfinite
        self.patch_size = patch_size  # the net's: the direction term needs each token's (C, p, p) layout

    def __call__(
        self,
        net: Callable,
        x0: torch.Tensor,
        y: torch.Tensor,
        hw: torch.Tensor,
        generator: torch.Generator | None = None,
        repa_projector: Callable | None = None,
        repa_z: torch.Tensor | None = None,
    ) -> LossOutput:
        """Draw t and ε, run the net on x_t, return the reduced loss and its parts."""
        n, device = x0.shape[0], x0.device
        _check_generator(generator, device)
        use_repa = self.repa_weight > 0
        if use_repa and (repa_projector is None or repa_z is None):
            raise ValueError("repa_weight > 0 needs repa_projector and repa_z (N, z_dim); pass both or set repa_weight=0")
        if use_repa and repa_z.shape[0] != n:
            raise ValueError(f"repa_z has {repa_z.shape[0]} rows but x0 has {n} tokens; one feature row per token")
        hw_d = hw.to(device=device, dtype=torch.long)
        seqlens = hw_d[:, 0] * hw_d[:, 1]
        # output_size keeps this sync-free; a wrong hw is caught by the net's own check of sum(h·w) == N.
        ids = torch.repeat_interleave(torch.arange(hw_d.shape[0], device=device), seqlens, output_size=n)
        t = sample_times(hw_d.shape[0], generator, device, self.P_mean, self.P_std)
        noise = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        x_t = interpolate(x0, noise, t[ids])
        target = (noise - x0).float()
        if use_repa:
            v_hat, hidden = net(x_t, t, y, hw, return_hidden_at=self.repa_layer)
        else:
            v_hat = net(x_t, t, y, hw)
        v_hat = v_hat.float()
        mse_N = (v_hat - target).pow(2).mean(dim=-1)
        parts = {"mse": _reduce(mse_N, ids, seqlens, self.reduction)}
        loss, loss_N = parts["mse"], mse_N.detach()
        if self.direction_weight != 0:
            dir_N = direction_per_token(v_hat, target, self.patch_size)
            parts["direction"] = _reduce(dir_N, ids, seqlens, self.reduction)
            loss = loss + self.direction_weight * parts["direction"]
            loss_N = loss_N + self.direction_weight * dir_N.detach()
        if use_repa:
            z_hat = repa_projector(hidden).float()
            repa_N = 1 - F.cosine_similarity(z_hat, repa_z.float(), dim=-1)
            parts["repa"] = _reduce(repa_N, ids, seqlens, self.reduction)
            loss = loss + self.repa_weight * parts["repa"]
            loss_N = loss_N + self.repa_weight * repa_N.detach()
        self._check_finite(loss, parts)
        per_image = torch.zeros(seqlens.shape[0], dtype=loss_N.dtype, device=device).index_add(0, ids, loss_N)
        return LossOutput(loss=loss, parts=parts, t=t, per_image=per_image / seqlens.to(loss_N.dtype))

    def _check_finite(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Raise naming the non-finite parts, or record parts["nonfinite"] = 1.0 (never zero the loss)."""
        names = list(parts)
        finite = torch.isfinite(torch.stack([parts[k].detach() for k in names] + [loss.detach()]))
        if self.on_nonfinite == "report":
            parts["nonfinite"] = (~finite).any().float()  # stays on device: no host sync in report mode
            return
        if not bool(finite.all()):  # the one host sync of a training step, needed to raise
            bad = {k: float(parts[k]) for k, ok in zip(names, finite.tolist()) if not ok}
            raise FloatingPointError(
                f"non-finite flow-matching loss {float(loss)}: non-finite parts {bad}; "
                "check the inputs (x0, repa_z) for NaN/Inf, lower the learning rate, or use on_nonfinite='report'"
            )
        parts["nonfinite"] = torch.zeros((), device=loss.device)
