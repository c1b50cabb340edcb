"""Samplers of the flow x_t = (1−t)·x0 + t·ε (SPEC §7): Euler / Heun ODE and Euler–Maruyama SDE on packed sequences.

`sample` is a pure function of (model_fn, noise, labels or captions, grids, guidance); randomness comes in as generators. Every
image owns its own generator (seeded from (seed, index)), so a sample set does not depend on packing or GPU count.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from nit_lightning.diffusion.guidance import Condition, GuidedModel, ModelFn, guidance_active, num_conditioned
from nit_lightning.models.text import PackedText

METHODS = ("euler", "heun", "sde")
SDE_T_LAST = 0.04  # the SDE grid ends at t = 0.04, then one deterministic step to 0 (REPA's Euler–Maruyama)
_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, index: int, stream: int = 0) -> int:
    """A 63-bit seed that depends only on (seed, index, stream): image `index`'s own RNG stream."""
    z = _splitmix64(int(seed) & _MASK64)
    z = _splitmix64(z ^ (int(index) & _MASK64))
    z = _splitmix64(z ^ (int(stream) & _MASK64))
    return z >> 1  # torch seeds must fit a signed 64-bit int


class StackedGenerator:
    """One torch.Generator per image (edm2 StackedRandomGenerator): packed draws = concat of per-image draws."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu", stream: int = 0) -> None:
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.generators = [
            torch.Generator(device=self.device).manual_seed(derive_seed(s, 0, stream)) for s in self.seeds
        ]

    def randn(self, seqlens: Sequence[int], dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(Σ seqlens, dim) standard normals; image i's rows come from generator i only (drawn in fp32, then cast)."""
        if len(seqlens) != len(self.generators):
            raise ValueError(f"{len(seqlens)} images but {len(self.generators)} per-image generators")
        parts = [
            torch.randn(int(n), dim, generator=g, device=self.device, dtype=torch.float32)
            for n, g in zip(seqlens, self.generators)
        ]
        return torch.cat(parts, dim=0).to(dtype)


def seqlens_of(hw_B2: torch.Tensor) -> list[int]:
    """Token count of every image (one host read of hw, which is tiny)."""
    return [int(h) * int(w) for h, w in hw_B2.tolist()]


def per_sample_noise(
    seeds: Sequence[int],
    hw: torch.Tensor,
    dim: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    stream: int = 0,
) -> torch.Tensor:
    """Packed starting noise (N, dim): image i's tokens depend only on seeds[i] and its grid hw[i]."""
    return StackedGenerator(seeds, device, stream=stream).randn(seqlens_of(hw), dim, dtype)


def _check_inputs(noise: torch.Tensor, y: Condition, hw: torch.Tensor, method: str, steps: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    if steps < 1 or (method == "sde" and steps < 2):
        raise ValueError(f"steps={steps} is too small for {method} (euler/heun need >= 1, sde >= 2)")
    if noise.ndim != 2 or hw.ndim != 2 or hw.shape[1] != 2 or num_conditioned(y) != hw.shape[0]:
        raise ValueError(f"expected noise (N, D), a condition of B images, hw (B, 2); got {tuple(noise.shape)}, "
                         f"{num_conditioned(y)} conditions, {tuple(hw.shape)}")
    if sum(seqlens_of(hw)) != noise.shape[0]:
        raise ValueError(f"hw describes {sum(seqlens_of(hw))} tokens but noise has {noise.shape[0]} rows")


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    noise: torch.Tensor,
    y: Condition,
    hw: torch.Tensor,
    *,
    method: str = "euler",
    steps: int = 50,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    null_class: int | None = None,
    generator: torch.Generator | StackedGenerator | None = None,
    dtype: torch.dtype = torch.float64,
    model_dtype: torch.dtype | None = None,
    sde_noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integrate packed noise (N, D) at t = 1 to samples at t = 0; returns (N, D) in noise's dtype.

    `dtype` is the integration dtype (float64 or float32); the model is called in `model_dtype` (default noise.dtype).
    SDE noise: `sde_noise` (steps−1, N, D) if given, else drawn per image from a StackedGenerator (invariant to
    packing), else from a plain torch.Generator / the global RNG (depends on packing).
    """
    _check_inputs(noise, y, hw, method, steps)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"integration dtype must be torch.float32 or torch.float64, got {dtype}")
    guided = GuidedModel(
        model_fn, cfg_scale=cfg_scale, cfg_interval=cfg_interval, null_class=null_class,
        model_dtype=model_dtype or noise.dtype, text=isinstance(y, PackedText),
    )
    x = noise.to(dtype)
    if method in ("euler", "heun"):
        x = _ode(guided, x, y, hw, steps, heun=method == "heun")
    else:
        x = _sde(guided, x, y, hw, steps, generator, sde_noise)
    return x.to(noise.dtype)


def ode_times(steps: int) -> list[float]:
    """The ODE grid t_0 = 1 > ... > t_steps = 0 as host floats (no device sync per step)."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()


def sde_times(steps: int) -> list[float]:
    """The SDE grid linspace(1, 0.04, steps) ++ [0]."""
    return torch.linspace(1.0, SDE_T_LAST, steps, dtype=torch.float64).tolist() + [0.0]


def model_calls(method: str, steps: int, cfg_scale: float = 1.0,
                cfg_interval: tuple[float, float] = (0.0, 1.0)) -> tuple[int, int]:
    """(NFE, guided): network evaluations per image (model calls of the sampler: Euler and SDE `steps`, Heun
    2·steps − 1) and how many of them also run CFG's null branch (inside the guidance interval; it rides in the same
    packed call on a doubled sequence, so that call costs twice the tokens)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    times = ode_times(steps) if method != "sde" else sde_times(steps)
    calls = guided = 0
    for k in range(steps):
        per_step = 2 if method == "heun" and k < steps - 1 else 1  # Heun's corrector decides at the predictor's time
        calls += per_step
        guided += per_step * guidance_active(times[k], cfg_scale, cfg_interval)
    return calls, guided


def _ode(f: GuidedModel, x: torch.Tensor, y: Condition, hw: torch.Tensor, steps: int, heun: bool) -> torch.Tensor:
    """Euler: x ← x + (t_{k+1} − t_k)·v̂(x, t_k); Heun adds the trapezoid corrector on all but the last step."""
    ts = ode_times(steps)
    for k in range(steps):
        t_cur, t_next = ts[k], ts[k + 1]
        dt = t_next - t_cur
        v = f(x, t_cur, y, hw)
        x_next = x + dt * v
        if heun and k < steps - 1:
            # The corrector keeps the predictor's guidance decision (taken at t_cur), as the reference.
            v_next = f(x_next, t_next, y, hw, decide_at=t_cur)
            x_next = x + dt * 0.5 * (v + v_next)
        x = x_next
    return x


def _sde(
    f: GuidedModel,
    x: torch.Tensor,
    y: Condition,
    hw: torch.Tensor,
    steps: int,
    generator: torch.Generator | StackedGenerator | None,
    sde_noise: torch.Tensor | None,
) -> torch.Tensor:
    """Euler–Maruyama on grid linspace(1, 0.04, steps) ++ [0]: steps−1 stochastic steps, one deterministic; NFE = steps."""
    if sde_noise is not None and sde_noise.shape != (steps - 1, *x.shape):
        raise ValueError(f"sde_noise must be (steps−1, N, D) = {(steps - 1, *x.shape)}, got {tuple(sde_noise.shape)}")
    ts = sde_times(steps)
    seqlens = seqlens_of(hw) if isinstance(generator, StackedGenerator) else None
    for k in range(steps):
        t_cur, t_next = ts[k], ts[k + 1]
        dt = t_next - t_cur
        v = f(x, t_cur, y, hw)
        # score s = −(x + (1−t)v)/t, g² = 2t: drift d = v − ½g²·s = v + x + (1−t)·v = x + (2−t)·v (no 1/t blow-up).
        drift = x + (2.0 - t_cur) * v
        x_next = x + dt * drift
        if k < steps - 1:
            if sde_noise is not None:
                xi = sde_noise[k].to(x.dtype)
            elif seqlens is not None:
                xi = generator.randn(seqlens, x.shape[1], x.dtype)
            else:
                xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
            x_next = x_next + (2.0 * t_cur) ** 0.5 * abs(dt) ** 0.5 * xi
        x = x_next
    return x


@dataclass(frozen=True)
class SampleRequest:
    """One image to generate: its global index, token grid (h, w), class label and its own seed."""

    index: int
    hw: tuple[int, int]
    label: int
    seed: int

    @property
    def tokens(self) -> int:
        return int(self.hw[0]) * int(self.hw[1])


def plan_sample_packs(
    requests: Sequence[SampleRequest], max_tokens: int, *, cfg: bool = False
) -> list[list[SampleRequest]]:
    """Split requests into packs of at most max_tokens model tokens (×2 with CFG: the null branch doubles the sequence).

    Next-fit over requests sorted by (size descending, index): O(n), same sizes share packs, at most one partly
    filled pack per distinct size. A request too big for the budget alone is an error.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    mult = 2 if cfg else 1
    too_big = [r for r in requests if r.tokens * mult > max_tokens]
    if too_big:
        r = too_big[0]
        raise ValueError(
            f"image {r.index} with a {r.hw[0]}x{r.hw[1]} token grid needs {r.tokens * mult} tokens"
            f"{' (CFG doubles it)' if cfg else ''} but the pack budget is {max_tokens}; raise --tokens-per-pack"
        )
    packs: list[list[SampleRequest]] = []
    used = max_tokens + 1
    for r in sorted(requests, key=lambda r: (-r.tokens, r.index)):
        need = r.tokens * mult
        if used + need > max_tokens:
            packs.append([])
            used = 0
        packs[-1].append(r)
        used += need
    return packs


def sample_pack(
    model_fn: ModelFn,
    pack: Sequence[SampleRequest],
    dim: int,
    *,
    device: torch.device | str = "cpu",
    noise_dtype: torch.dtype = torch.float32,
    condition: PackedText | None = None,
    **sample_kwargs,
) -> torch.Tensor:
    """Sample one pack of requests with per-image noise (stream 0) and per-image SDE noise (stream 1): (N, dim).

    The condition is the requests' labels, or `condition` (the pack's captions, in pack order) for NiT-T2I."""
    seeds = [r.seed for r in pack]
    hw = torch.tensor([list(r.hw) for r in pack], dtype=torch.long, device=device)
    if condition is not None and condition.num_images != len(pack):
        raise ValueError(f"{condition.num_images} captions for a pack of {len(pack)} images")
    y = (torch.tensor([r.label for r in pack], dtype=torch.long, device=device) if condition is None
         else condition.to(device))
    noise = per_sample_noise(seeds, hw, dim, device=device, dtype=noise_dtype, stream=0)
    gen = StackedGenerator(seeds, device, stream=1)
    return sample(model_fn, noise, y, hw, generator=gen, **sample_kwargs)
