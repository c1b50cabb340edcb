"""`NiTModule`: the LightningModule that trains a NiT (class labels) or a NiT-T2I (captions) with flow matching on
packed batches (SPEC §3, §6, §10): one training step for both conditionings."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule

from nit_lightning.data.batch import PackedBatch
from nit_lightning.data.codecs import codec_description_of
from nit_lightning.data.datamodule import NativeLatentDataModule
from nit_lightning.records import CheckpointMeta, SamplingRecipe, plain
from nit_lightning.training.checkpoints import checkpoint_dir_of
from nit_lightning.training.compile import compile_net, resolve_compile_mode
from nit_lightning.training.encoders import repa_layer_for
from nit_lightning.training.net_setup import checkpoint_blocks, init_from_official, net_config_for_data
from nit_lightning.training.nonfinite import NonFinitePolicy
from nit_lightning.training.optim import adamw_with_schedule, check_optim_args, clip_unscaled_gradients
from nit_lightning.training.seeds import step_seed
from nit_lightning.training.text_condition import text_conditioner_for

class NiTModule(LightningModule):
    """Flow-matching training of the NiT built from `net` = {"name": preset, **NiTConfig overrides} by `build_nit`, or
    of the NiT-T2I built by `build_nit_t2i` when the preset is a T2I one (NiT-T2I, NiT-T2I-debug).

    Args:
        net: the network's config: `{"name": "NiT-B"}` plus any NiTConfig field (depth, hidden_size, in_channels, ...);
            for NiT-T2I any NiTT2IConfig field (text_dim is filled in from the text encoder).
        text_encoder: NiT-T2I only: the frozen encoder of the captions, `hf:PATH` (a local transformers folder, e.g.
            Gemma3-1B-it) or `tinytext:PATH` (data/tinytext.py); its description goes into every checkpoint.
        latent_channels: channels of the data's latents; linked from the datamodule by the CLI and checked against
            (or filling in) `net["in_channels"]`.
        P_mean, P_std, direction_weight, reduction: FlowMatchingLoss settings (SPEC §3).
        on_nonfinite: "raise" (default) stops with the step and batch keys on a NaN/Inf loss; "skip" skips the
            optimiser step loudly and counts it (single process only), until more than max_skipped_steps_fraction
            of trainer.max_steps were skipped, or more than max_consecutive_skipped_steps in a row: then the run
            stops (training/nonfinite.py).
        label_dropout: probability of replacing a label by the null class, or a caption by the null caption (length
            0), in the training step (CFG training).
        lr, betas, weight_decay, eps: AdamW (SPEC §6); never scaled by the GPU count.
        warmup_steps: optional linear warm-up of the lr over that many optimiser steps, constant after.
        compile: "none" | "blocks" (each block in place) | "model" (all blocks and the final layer as one graph, see
            training/compile.py); None takes `compile_blocks` (the older switch: true = "blocks").
        compile_backend: torch.compile backend ("inductor"; "aot_eager" in CPU tests).
        activation_checkpointing: per block of `net.blocks`; applied in `configure_model`, before compiling.
        lr_schedule: "constant" (the paper) or "cosine": after the warm-up, a cosine from lr down to
            lr·lr_min_ratio at `trainer.max_steps` (short runs, e.g. the CPU demo, end on a low lr).
        repa_weight, repa_layer, repa_encoder: REPA (off when repa_weight is 0) with the net's own projector
            (`net.projector_dim` = encoder feature size); features come from the batch's `repa_z` or from the frozen
            encoder at the local path `repa_encoder` (see training/encoders.py).
        init_from: official safetensors loaded strictly into the net before training (SPEC §9).
        seed: base of the per-(rank, step) generators for noise, times and label dropout.
        sampler: the sampler this model is meant to be sampled with (SamplerSettings keys, e.g. {method: heun,
            steps: 8, cfg_scale: 3.0, cfg_interval: [0, 0.9]}). Every checkpoint records it with the token grids
            trained on (CheckpointMeta.sampling); `sample` and the sample-grid callback use it unless told otherwise.
    """

    def __init__(
        self,
        net: dict[str, Any],
        latent_channels: int | None = None,
        P_mean: float = 0.0,
        P_std: float = 1.0,
        direction_weight: float = 1.0,
        reduction: Literal["token", "image"] = "token",
        on_nonfinite: Literal["raise", "skip"] = "raise",
        max_skipped_steps_fraction: float = 0.01,
        max_consecutive_skipped_steps: int = 10,
        label_dropout: float = 0.1,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.01,
        eps: float = 1e-6,
        warmup_steps: int = 0,
        compile: Literal["none", "blocks", "model"] | None = None,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        lr_min_ratio: float = 0.0,
        compile_blocks: bool = False,
        compile_backend: str = "inductor",
        activation_checkpointing: bool = False,
        repa_weight: float = 0.0,
        repa_layer: int | None = None,
        repa_encoder: str | None = None,
        init_from: str | None = None,
        seed: int = 0,
        sampler: dict[str, Any] | None = None,
        text_encoder: str | None = None,
    ):
        super().__init__()
        from nit_lightning.diffusion.flow import FlowMatchingLoss
        from nit_lightning.models import T2I_PRESETS, build_nit, build_nit_t2i

        self.save_hyperparameters()
        net = net_config_for_data(net, latent_channels)
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        check_optim_args(lr, warmup_steps, lr_schedule, lr_min_ratio)
        self.compile_mode = resolve_compile_mode(compile, compile_blocks)
        if sampler is not None:  # a misspelt key fails here, not when someone samples the finished run
            from nit_lightning.generation.settings import SamplerSettings

            SamplerSettings.from_dict(plain(sampler), where="model.sampler")
        self.text = text_conditioner_for(net, text_encoder, T2I_PRESETS)
        self.net = (build_nit_t2i if self.text is not None else build_nit)(net.pop("name"), **net)

        self.repa_encoder_path = repa_encoder
        self._repa_encoder = None
        self.loss_fn = FlowMatchingLoss(
            P_mean=P_mean, P_std=P_std, direction_weight=direction_weight, reduction=reduction,
            repa_weight=repa_weight, repa_layer=repa_layer_for(self.net, self.hparams["net"]["name"], repa_weight,
                                                              repa_layer),
            on_nonfinite="report",  # the module decides: raise with step and keys, or skip loudly
            patch_size=self.net.config.patch_size,  # the direction term is a cosine per latent pixel
        )
        self.nonfinite = NonFinitePolicy(on_nonfinite, max_skipped_steps_fraction,
                                         max_consecutive_skipped_steps)
        self._configured = False
        if init_from is not None:
            init_from_official(self.net, init_from)

    # ---- building ------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Per-block activation checkpointing, then torch.compile, applied once from outside the network."""
        if self._configured:
            return
        self._configured = True
        if self.hparams.activation_checkpointing:
            checkpoint_blocks(self.net)
        # In place: keys stay `blocks.i.*`, no `_orig_mod.` prefix.
        compile_net(self.net, self.compile_mode, backend=self.hparams.compile_backend)

    def setup(self, stage: str) -> None:
        trainer = self._trainer
        if trainer is None:
            return
        if self.hparams.on_nonfinite == "skip" and trainer.world_size > 1:
            raise ValueError("on_nonfinite='skip' works on one process only (a skipped step would hang DDP); use 'raise'")
        if self.compile_mode == "model":
            from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

            strategy = getattr(trainer, "strategy", None)
            if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
                raise ValueError(f"model.compile=model with {type(strategy).__name__}: FSDP shards per block and its hooks "
                                 "do not belong inside one compiled graph; use model.compile=blocks")
        dm = getattr(trainer, "datamodule", None)
        patch = getattr(dm, "patch_size", None)
        if patch is not None and int(patch) != int(self.net.config.patch_size):
            raise ValueError(f"data.patch_size={patch} but the network's patch_size={self.net.config.patch_size}; "
                             "set both to the same value")

    def configure_optimizers(self) -> Any:
        """AdamW with the recipe's settings (SPEC §6: lr never scaled by the GPU count), warm-up and schedule."""
        max_steps = int(getattr(self._trainer, "max_steps", -1) or -1) if self._trainer is not None else -1
        return adamw_with_schedule([p for p in self.parameters() if p.requires_grad], self.hparams, max_steps,
                                   fused=self.device.type == "cuda" and self._gradient_scaler() is None)

    def _gradient_scaler(self) -> Any:
        """The fp16 GradScaler of the precision plugin, or None (bf16, fp32, no trainer)."""
        trainer = self._trainer
        return getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip as Lightning's precision plugin would, also for the fused AdamW on CUDA (training/optim.py)."""
        if self._gradient_scaler() is not None or not gradient_clip_val:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        clip_unscaled_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- steps ---------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
        return self.net(x, t, y, hw)

    def _generator(self, step: int, micro: int, stream: str) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        generator.manual_seed(step_seed(int(self.hparams.seed), self.global_rank, step, micro, stream))
        return generator

    def _drop_labels(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Replace each label by the null class with probability label_dropout (drawn on y's device)."""
        p = float(self.hparams.label_dropout)
        if p == 0.0:
            return y
        drop = torch.rand(y.shape, generator=generator, device=y.device) < p
        return torch.where(drop, torch.full_like(y, self.net.null_class), y)

    def _condition(self, batch: PackedBatch, generator: torch.Generator | None, where: str) -> Any:
        """What the net is conditioned on: labels (NiT) or caption tokens (NiT-T2I); dropped for CFG when a generator
        is given (training), whole otherwise (validation, test, predict)."""
        if self.text is None:
            return batch.y if generator is None else self._drop_labels(batch.y, generator)
        p = float(self.hparams.label_dropout)
        drop = None
        if generator is not None and p > 0.0:  # the same draw as for labels: one uniform per image
            drop = torch.rand(batch.y.shape, generator=generator, device=batch.y.device) < p
        text = self.text.condition(batch.captions, drop, self.device, where=where)
        self.last_text_lengths = text.lengths  # caption tokens as trained: ThroughputMonitor counts their FLOPs
        return text

    def _repa_features(self, batch: PackedBatch) -> torch.Tensor | None:
        if self.loss_fn.repa_weight <= 0:
            return None
        if batch.repa_z is not None:
            return batch.repa_z
        if self.repa_encoder_path is None:
            raise ValueError("REPA is on but the batch has no repa_z and model.repa_encoder is not set")
        if self._repa_encoder is None:
            from nit_lightning.training.encoders import load_repa_encoder

            self._repa_encoder = load_repa_encoder(self.repa_encoder_path,
                                                   codec=codec_description_of(self.trainer.datamodule),
                                                   patch_size=self.net.config.patch_size, device=self.device)
        return self._repa_encoder(batch.x, batch.hw)

    def _loss(self, batch: PackedBatch, y: torch.Tensor, generator: torch.Generator) -> Any:
        return self.loss_fn(self.net, batch.x, y, batch.hw, generator=generator,
                            repa_projector=self.net.projector, repa_z=self._repa_features(batch))

    def training_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor | None:
        accumulate = max(1, int(getattr(self._trainer, "accumulate_grad_batches", 1) or 1))
        generator = self._generator(self.global_step, batch_idx % accumulate, "train")
        y = self._condition(batch, generator, where=f"training step {self.global_step}")
        out = self._loss(batch, y, generator)
        loss = out.loss
        if not bool(torch.isfinite(loss)):  # the one host sync of the step: needed to raise or skip before backward
            max_steps = int(getattr(self._trainer, "max_steps", -1) or -1) if self._trainer is not None else -1
            self.nonfinite.handle(loss.detach().cpu().item(), f"step {self.global_step} (batch {batch_idx}, rank "
                                  f"{self.global_rank})", list(batch.keys)[:20], taken=self.global_step,
                                  max_steps=max_steps)
            self.log("optim/skipped_steps", float(self.skipped_steps), batch_size=batch.num_images)
            return None
        self.nonfinite.finite()
        B = batch.num_images
        # TensorBoard sorts tag groups by name: loss/, lr-AdamW, optim/, perf/ come before samples and data health.
        self.log("loss/train", loss.detach(), prog_bar=True, batch_size=B)
        self.log_dict({f"loss/train_{k}": v.detach() for k, v in out.parts.items() if k != "nonfinite"}, batch_size=B)
        return loss

    def validation_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        # Fixed noise per (rank, batch): validation losses of different epochs are comparable. No label dropout.
        generator = self._generator(0, batch_idx, "val")
        out = self._loss(batch, self._condition(batch, None, "validation"), generator)
        self.log("loss/val", out.loss, prog_bar=True, sync_dist=True, batch_size=batch.num_images)
        return out.loss

    def test_step(self, batch: PackedBatch, batch_idx: int) -> torch.Tensor:
        """The flow-matching loss on the test split (`--data.test_sources`), with fixed noise like validation."""
        out = self._loss(batch, self._condition(batch, None, "test"), self._generator(0, batch_idx, "test"))
        self.log("test/loss", out.loss, sync_dist=True, batch_size=batch.num_images)
        for name, value in out.parts.items():
            if name != "nonfinite":
                self.log(f"test/{name}", value, sync_dist=True, batch_size=batch.num_images)
        return out.loss

    def predict_step(self, batch: PackedBatch, batch_idx: int) -> dict[str, Any]:
        """Per-image loss at a fixed (seeded) noise level: finds the samples the model fits worst (data audits)."""
        out = self._loss(batch, self._condition(batch, None, "predict"), self._generator(0, batch_idx, "predict"))
        return {"keys": list(batch.keys), "y": batch.y.cpu(), "hw": batch.hw.cpu(), "t": out.t.detach().cpu(),
                "loss": out.per_image.cpu()}

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def sampling_recipe(self) -> SamplingRecipe:
        """The recommended sampler (model.sampler) and the token grids of the training data, when known."""
        dm = self._trainer.datamodule if self._trainer is not None else None
        sampler = self.hparams.get("sampler")
        return SamplingRecipe(sampler=plain(sampler) if sampler is not None else None,
                              trained_tokens=dm.trained_tokens() if isinstance(dm, NativeLatentDataModule) else None)

    def checkpoint_meta(self) -> CheckpointMeta:
        """What `generation.pipeline.load_pipeline` and a resume need: the net, its codec, the data it trained on, how
        to sample it."""
        dm = self._trainer.datamodule if self._trainer is not None else None
        described = isinstance(dm, NativeLatentDataModule)
        return CheckpointMeta(
            net_config=asdict(self.net.config),
            codec=codec_description_of(dm),
            patch_size=int(self.net.config.patch_size),
            latent_channels=int(self.net.config.in_channels),
            data=dm.provenance() if described else None,
            step=int(self._trainer.global_step) if self._trainer is not None else None,
            skipped_steps=int(self.skipped_steps),
            sampling=self.sampling_recipe().as_dict(),
            conditioning="text" if self.text is not None else "class",
            text_encoder=self.text.describe() if self.text is not None else None,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        where = checkpoint_dir_of(self._trainer) if self._trainer is not None else None
        self.checkpoint_meta().store(checkpoint, where)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite.skipped = CheckpointMeta.from_checkpoint(checkpoint).skipped_steps

    @property
    def skipped_steps(self) -> int:
        """Optimiser steps skipped for a non-finite loss so far (on_nonfinite=skip), resumed with the run."""
        return self.nonfinite.skipped
