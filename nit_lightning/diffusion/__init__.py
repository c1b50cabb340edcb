"""Flow-matching objective and samplers."""
from __future__ import annotations

from nit_lightning.diffusion.flow import FlowMatchingLoss, LossOutput, interpolate, sample_times

__all__ = ["FlowMatchingLoss", "LossOutput", "interpolate", "sample_times"]
