"""The flow-matching method as pure functions: the training loss and the samplers.

flow.py (the path x_t = (1−t)·x0 + t·ε, logit-normal times, FlowMatchingLoss: a callable that takes the net),
sampling.py (Euler / Heun / SDE over packed sequences, per-image seeds, pack planning), guidance.py (CFG with an
interval, wrapped around any packed model_fn).
"""
from __future__ import annotations

from nit_lightning.diffusion.flow import FlowMatchingLoss, LossOutput, interpolate, sample_times

__all__ = ["FlowMatchingLoss", "LossOutput", "interpolate", "sample_times"]
