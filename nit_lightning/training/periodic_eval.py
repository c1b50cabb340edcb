"""Evaluation during training: every N steps a small sweep (a few hundred samples per setting) with the EMA weights.

Samples come from the generation iterator (image i: label i mod classes, seed derive_seed(seed, i), so the set does
not depend on the GPU count); every rank makes its share, features are reduced with the DDP-safe `ADMFeatureStats`,
and rank 0 logs `<prefix>/<HxW>/{fid,sfid,is,precision,recall}` to the trainer's loggers (prefix `quality`: the group
sorts after loss/, lr, optim/ and perf/ in TensorBoard).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer

from nit_lightning import distributed
from nit_lightning.data.codecs import Codec
from nit_lightning.evaluation.evaluate import sample_feature_stats
from nit_lightning.evaluation.extractors import FeatureExtractor, load_feature_extractor
from nit_lightning.evaluation.metrics import compare
from nit_lightning.evaluation.reference import Reference, check_extractor, load_reference, reference_pool
from nit_lightning.generation.settings import Sweep, load_sweep, setting_from_dict
from nit_lightning.records.names import WEIGHTS_DOCS
from nit_lightning.training.periodic import SamplingCallback

log = logging.getLogger(__name__)
METRICS = ("fid", "sfid", "is", "precision", "recall")


class EvaluationCallback(SamplingCallback):
    """Every `every_n_steps` optimiser steps: sample + FID/sFID/IS/precision/recall per setting, logged."""

    def __init__(self, ref_dir: str, every_n_steps: int = 10000, sweep: str | None = None,
                 settings: Sequence[dict[str, Any]] | None = None, sizes: Sequence[str] | None = None,
                 num_samples: int = 500, features: str = "inception", codec: str | dict | Codec | None = None,
                 steps: int | None = None, seed: int = 0, tokens_per_forward: int = 16384, at_train_end: bool = True,
                 prefix: str = "quality") -> None:
        super().__init__(every_n_steps, at_train_end, codec)
        if num_samples < 2:
            raise ValueError(f"num_samples ({num_samples}) must be >= 2 (a covariance needs two samples)")
        if (sweep is None) == (settings is None):
            raise ValueError("give exactly one of sweep (a YAML like experiments/sweeps/resolution.yaml) or settings")
        chosen = load_sweep(sweep) if sweep is not None else Sweep(tuple(
            setting_from_dict(dict(s), where="EvaluationCallback settings") for s in settings))
        chosen = chosen.select(sizes)
        if steps is not None:  # a cheaper solver than the published one, for a quick signal during training
            chosen = dataclasses.replace(chosen, settings=tuple(
                dataclasses.replace(s, sampler=dataclasses.replace(s.sampler, steps=steps)) for s in chosen.settings))
        self.settings = chosen.settings
        self.ref_dir, self.num_samples, self.features = Path(ref_dir), int(num_samples), features
        self.seed, self.tokens_per_forward, self.prefix = int(seed), int(tokens_per_forward), prefix
        self._extractor: FeatureExtractor | None = None
        self._refs: dict[str, tuple[Reference, torch.Tensor]] = {}
        self.last_results: dict[str, dict[str, Any]] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Fail before training when a reference batch is missing."""
        if getattr(pl_module, "text", None) is not None:
            raise ValueError("EvaluationCallback samples class-balanced sets (NiT); a NiT-T2I run is evaluated from "
                             "prompts: `make eval-t2i` (docs/t2i.md), and shows prompt grids with SampleGridCallback")
        missing = [str(self.ref_dir / f"{s.name}.npz") for s in self.settings
                   if not (self.ref_dir / f"{s.name}.npz").is_file()]
        if missing:
            raise FileNotFoundError(f"EvaluationCallback: reference batches {missing} not found; build them with "
                                    f"`python -m nit_lightning reference build` (ADM's 256/512: {WEIGHTS_DOCS})")

    def fire(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.run(trainer, pl_module)

    def _reference(self, size: str, extractor: FeatureExtractor) -> tuple[Reference, torch.Tensor]:
        if size not in self._refs:
            path = self.ref_dir / f"{size}.npz"
            ref = load_reference(path)
            check_extractor(ref, extractor, path)
            self._refs[size] = (ref, reference_pool(ref, extractor))
        return self._refs[size]

    def run(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, dict[str, Any]]:
        """Sample and evaluate every setting; rank 0 logs and returns the metrics."""
        self._last_step = trainer.global_step
        device = next(pl_module.net.parameters()).device
        if self._extractor is None:
            self._extractor = load_feature_extractor(self.features, device=device)
        ranks = distributed.Ranks(trainer.global_rank, trainer.world_size)
        results: dict[str, dict[str, Any]] = {}
        with self.pipeline(trainer, pl_module) as pipe:
            for setting in self.settings:
                stats = sample_feature_stats(pipe, setting, self._extractor, num=self.num_samples, seed=self.seed,
                                             ranks=ranks, tokens_per_forward=self.tokens_per_forward, device=device)
                synced = stats.compute()  # all ranks take part in the all-reduce / gather
                if trainer.is_global_zero:
                    ref, ref_pool = self._reference(setting.name, self._extractor)
                    results[setting.name] = compare(synced, ref.stats(), ref_pool)
        if trainer.is_global_zero:
            scalars = {f"{self.prefix}/{size}/{key}": float(value) for size, r in results.items()
                       for key, value in r.items() if key in METRICS}
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=trainer.global_step)
            log.info("evaluation at step %d (%s, %d samples per setting): %s", trainer.global_step,
                     self._extractor.name, self.num_samples, scalars)
        self.last_results = results
        return results
