"""Training: the LightningModule and what runs beside it in the Trainer.

module.py (NiTModule: the loss on packs, label dropout, per-step generators), compile.py (compile modes, applied from
outside the net), optim.py (AdamW, warm-up, cosine), ema.py (EMA callback), callbacks.py (throughput / MFU, grad norm, skipped data, pack log),
periodic.py (every-N-steps and sampling callback bases), sample_grid.py and periodic_eval.py (grids and metrics during
training, through generation), fault_tolerance.py (stop and requeue on a signal), auto_resume.py and checkpoints.py
(resume from the newest valid checkpoint, damaged ones named), provenance.py (what a checkpoint records of its run and
the checks before a resume), strategies.py (FSDP2 + sharded EMA), encoders.py (REPA).
"""
from __future__ import annotations

from nit_lightning.training.callbacks import DataHealthMonitor, GradNormMonitor, PackLog, ThroughputMonitor
from nit_lightning.training.ema import EMA, unwrap_net
from nit_lightning.training.module import NiTModule
from nit_lightning.training.seeds import step_seed

__all__ = [
    "EMA", "DataHealthMonitor", "GradNormMonitor", "NiTModule", "PackLog", "ThroughputMonitor", "step_seed", "unwrap_net",
]
