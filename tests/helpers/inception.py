"""A FID Inception with random weights for the tests (its numbers mean nothing; real weights are not on this machine)."""
from __future__ import annotations

import torch

from nit_lightning.evaluation.inception import FIDInceptionV3


def random_inception(seed: int = 0, *, compute_dtype: torch.dtype = torch.float32) -> FIDInceptionV3:
    """The exact architecture and state-dict layout, weights drawn from `seed` without touching the global RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = FIDInceptionV3(compute_dtype=torch.float32)
    model.name = f"random-inception(seed={seed}) [TEST ONLY, not Inception weights]"
    model.compute_dtype = compute_dtype
    return model.to(dtype=compute_dtype).eval()
