"""Evaluation during training: every N steps a small sweep (a few hundred samples per setting) with the EMA weights.

Samples are made in-process with `diffusion.sampling` (image i: label i mod classes, seed derive_seed(seed, i), so
the set does not depend on the GPU count); every rank makes its share, features are reduced with the DDP-safe
`ADMFeatureStats`, and rank 0 logs `<prefix>/<HxW>/{fid,sfid,is,precision,recall}` to the trainer's loggers.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch import LightningModule, Trainer

from nit_lightning.data.sizes import format_size, parse_size
from nit_lightning.evaluation.features import FeatureExtractor, load_feature_extractor
from nit_lightning.evaluation.metrics import ADMFeatureStats, compare
from nit_lightning.evaluation.reference import Reference, check_extractor, load_reference, reference_pool
from nit_lightning.evaluation.sweep import load_sweep
from nit_lightning.training.periodic import EveryNStepsCallback

log = logging.getLogger(__name__)


@torch.no_grad()
def sample_features(net: torch.nn.Module, codec: Any, setting: dict[str, Any], extractor: FeatureExtractor, *,
                    num: int, seed: int = 0, rank: int = 0, world: int = 1, tokens_per_pack: int = 16384,
                    precision: str = "fp32", device: torch.device | str = "cpu") -> ADMFeatureStats:
    """This rank's share (indices rank, rank + world, ...) of `num` samples of one setting, as feature statistics."""
    from nit_lightning.diffusion.sampling import SampleRequest, derive_seed, plan_sample_packs, sample_pack
    from nit_lightning.generation.pipeline import Pipeline

    gen = Pipeline(net=net, codec=codec)
    h, w = parse_size(setting["size"])
    m = gen.size_multiple
    if h % m or w % m:
        raise ValueError(f"evaluation size {h}x{w} is not a multiple of {m} (codec factor x patch size)")
    num_classes = int(net.config.num_classes)
    requests = [SampleRequest(i, (h // m, w // m), i % num_classes, derive_seed(seed, i))
                for i in range(rank, num, world)]
    cfg_scale = float(setting["cfg_scale"])
    packs = plan_sample_packs(requests, tokens_per_pack, cfg=cfg_scale != 1.0)
    stats = ADMFeatureStats(extractor.dims["pool"], extractor.dims["spatial"], keep_rows=True).to(device)
    for pack in packs:
        x = sample_pack(gen.model_fn(precision), pack, gen.token_dim, device=device, method=setting["method"],
                        steps=int(setting["steps"]), cfg_scale=cfg_scale,
                        cfg_interval=tuple(setting["cfg_interval"]), null_class=net.null_class)
        images = torch.stack(gen.decode(x, torch.tensor([list(r.hw) for r in pack])))  # (B, 3, H, W) uint8
        stats.update({k: v.to(device) for k, v in extractor(images).items()})
    return stats


class EvaluationCallback(EveryNStepsCallback):
    """Every `every_n_steps` optimiser steps: sample + FID/sFID/IS/precision/recall per setting, logged."""

    def __init__(self, ref_dir: str, every_n_steps: int = 10000, sweep: str | None = None,
                 settings: Sequence[dict[str, Any]] | None = None, sizes: Sequence[str] | None = None,
                 num_samples: int = 500, features: str = "inception", codec: str | dict | None = None,
                 steps: int | None = None, seed: int = 0, tokens_per_pack: int = 16384, precision: str = "fp32",
                 at_train_end: bool = True, prefix: str = "eval") -> None:
        if every_n_steps < 1 or num_samples < 2:
            raise ValueError(f"every_n_steps ({every_n_steps}) must be >= 1 and num_samples ({num_samples}) >= 2")
        if (sweep is None) == (settings is None):
            raise ValueError("give exactly one of sweep (a YAML like experiments/sweeps/resolution.yaml) or settings")
        chosen = list(load_sweep(sweep)["settings"]) if sweep is not None else [dict(s) for s in settings]
        for s in chosen:
            s["size"] = format_size(parse_size(str(s["size"])))
            s.setdefault("cfg_interval", [0.0, 1.0])
            if steps is not None:  # a cheaper solver than the published one, for a quick signal during training
                s["steps"] = steps
        if sizes:
            wanted = {format_size(parse_size(s)) for s in sizes}
            chosen = [s for s in chosen if s["size"] in wanted]
            if len(chosen) != len(wanted):
                raise ValueError(f"sizes {sorted(wanted)} not all in the settings {[s['size'] for s in chosen]}")
        self.settings = chosen
        self.ref_dir, self.every_n_steps, self.num_samples = Path(ref_dir), int(every_n_steps), int(num_samples)
        self.features, self.codec_arg, self.seed = features, codec, int(seed)
        self.tokens_per_pack, self.precision, self.at_train_end, self.prefix = (int(tokens_per_pack), precision,
                                                                                 at_train_end, prefix)
        self._extractor: FeatureExtractor | None = None
        self._refs: dict[str, tuple[Reference, torch.Tensor | None]] = {}
        self._last_step = -1
        self.last_results: dict[str, dict[str, Any]] = {}

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Fail before training when a reference batch is missing."""
        missing = [str(self.ref_dir / f"{s['size']}.npz") for s in self.settings
                   if not (self.ref_dir / f"{s['size']}.npz").is_file()]
        if missing:
            raise FileNotFoundError(f"EvaluationCallback: reference batches {missing} not found; build them with "
                                    "`python -m nit_lightning reference build`")

    def fire(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.run(trainer, pl_module)

    def _codec(self, trainer: Trainer) -> Any:
        from nit_lightning.data.codecs import resolve_codec

        description = getattr(getattr(trainer, "datamodule", None), "codec_description", None)
        return resolve_codec(self.codec_arg, description, fallback_name="datamodule", missing=(
            "EvaluationCallback needs a codec: pass codec='pixel:F' / 'dcae:PATH' or use a datamodule with "
            "`codec_description`"))[0]

    def _weights(self, trainer: Trainer, pl_module: LightningModule):
        for cb in trainer.callbacks:
            if cb is not self and callable(getattr(cb, "swapped_in", None)):
                return cb.swapped_in(pl_module)
        log.warning("EvaluationCallback: no EMA callback with swapped_in(); evaluating the live weights")
        return contextlib.nullcontext()

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
        net = pl_module.net
        device = next(net.parameters()).device
        if self._extractor is None:
            self._extractor = load_feature_extractor(self.features, device=device)
        codec = self._codec(trainer)
        results: dict[str, dict[str, Any]] = {}
        was_training = net.training
        net.eval()
        try:
            with self._weights(trainer, pl_module):
                for setting in self.settings:
                    stats = sample_features(net, codec, setting, self._extractor, num=self.num_samples,
                                            seed=self.seed, rank=trainer.global_rank, world=trainer.world_size,
                                            tokens_per_pack=self.tokens_per_pack, precision=self.precision,
                                            device=device)
                    synced = stats.compute()  # all ranks take part in the all-reduce / gather
                    if trainer.is_global_zero:
                        ref, ref_pool = self._reference(setting["size"], self._extractor)
                        results[setting["size"]] = compare(synced, ref.stats(), ref_pool)
        finally:
            net.train(was_training)
        if trainer.is_global_zero:
            scalars = {f"{self.prefix}/{size}/{key}": float(value) for size, r in results.items()
                       for key, value in r.items() if key in ("fid", "sfid", "is", "precision", "recall")}
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=trainer.global_step)
            log.info("evaluation at step %d (%s, %d samples per setting): %s", trainer.global_step,
                     self._extractor.name, self.num_samples, scalars)
        self.last_results = results
        return results
