"""Training: the LightningModule, EMA, callbacks (throughput/MFU, grad norm, pack log) and the LightningCLI."""
from __future__ import annotations

from nit_lightning.training.callbacks import GradNormMonitor, PackLog, ThroughputMonitor
from nit_lightning.training.ema import EMA, unwrap_net
from nit_lightning.training.module import NiTModule, step_seed

__all__ = ["EMA", "GradNormMonitor", "NiTModule", "PackLog", "ThroughputMonitor", "step_seed", "unwrap_net"]
