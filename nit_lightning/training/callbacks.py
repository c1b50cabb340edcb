"""Training callbacks: throughput/MFU, gradient norm + non-finite guard, skipped data, pack audit log."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per GPU (vendor datasheets, without sparsity), matched against the CUDA device name.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A6000": 155e12, "4090": 165e12}


def detect_peak_flops(device: torch.device) -> float | None:
    """Datasheet bf16 peak of the CUDA device, or None when unknown (CPU, unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def train_step_flops(config: Any, seqlens: torch.Tensor, with_projector: bool = False,
                     text_lengths: torch.Tensor | None = None) -> float:
    """FLOPs of forward + backward of the net over images with these token counts (and, for NiT-T2I, caption
    lengths) (models/flops.py)."""
    from nit_lightning.models.flops import training_flops

    return float(training_flops(config, seqlens, with_projector=with_projector, text_lengths=text_lengths))


class ThroughputMonitor(Callback):
    """Tokens/s, images/s, tokens and images seen, packing efficiency, step time, MFU and GPU memory.

    Rates are measured over windows of `window` optimiser steps with one device sync at the end of each window, and
    summed over ranks by multiplying the local rate by the world size (every rank runs the same token budget).
    MFU = achieved training FLOP/s ÷ (peak FLOP/s × world size); `peak_flops` None means "detect from the GPU name",
    0 turns MFU off (it is always off on CPU).
    """

    def __init__(self, window: int = 20, peak_flops: float | None = None):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window, self.peak_flops = int(window), peak_flops
        self.tokens_seen = 0  # over all ranks; kept in checkpoints so that resumed curves continue
        self.images_seen = 0
        self._reset_window()

    def _reset_window(self) -> None:
        self._t0: float | None = None
        self._tokens = self._images = self._steps = 0
        self._seqlens: list[torch.Tensor] = []  # stays on device until the window's sync: no per-step host sync
        self._text_lengths: list[torch.Tensor] = []  # NiT-T2I: caption tokens per image as trained (0 = dropped)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(window=self.window)

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_seen": self.tokens_seen, "images_seen": self.images_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_seen = int(state_dict["tokens_seen"])
        self.images_seen = int(state_dict["images_seen"])

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.peak_flops is None:
            self.peak_flops = detect_peak_flops(pl_module.device)
            if pl_module.device.type == "cuda" and self.peak_flops is None:
                log.warning("MFU off: peak FLOP/s of %s unknown; set ThroughputMonitor.peak_flops",
                            torch.cuda.get_device_name(pl_module.device))
        self._reset_window()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        world = trainer.world_size
        tokens, images = batch.num_tokens, batch.num_images
        self.tokens_seen += tokens * world
        self.images_seen += images * world
        self._tokens += tokens
        self._images += images
        self._steps += 1
        if self.peak_flops:
            self._seqlens.append(batch.seqlens.detach())
            text = getattr(pl_module, "last_text_lengths", None)
            if text is not None:
                self._text_lengths.append(text.detach())
        if self._steps < self.window:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)  # the one sync per window: time what the GPU really did
        seconds = max(time.perf_counter() - (self._t0 or time.perf_counter()), 1e-9)
        metrics = {
            "perf/tokens_per_s": self._tokens * world / seconds,
            "perf/images_per_s": self._images * world / seconds,
            "perf/step_time_s": seconds / self._steps,
            "perf/tokens_seen": float(self.tokens_seen),
            "perf/images_seen": float(self.images_seen),
        }
        efficiency = getattr(trainer.datamodule, "packing_efficiency", None)  # a property of NativeLatentDataModule
        if efficiency is not None:
            metrics["perf/packing_efficiency"] = float(efficiency)
        if self.peak_flops:
            # FLOPs add up over images, so the window's packs count as one long pack; per rank ÷ per-GPU peak.
            repa = getattr(getattr(pl_module, "loss_fn", None), "repa_weight", 0.0) > 0
            text = torch.cat(self._text_lengths).cpu() if self._text_lengths else None
            flops = train_step_flops(pl_module.net.config, torch.cat(self._seqlens).cpu(), with_projector=repa,
                                     text_lengths=text)
            metrics["perf/mfu"] = flops / seconds / self.peak_flops
        if pl_module.device.type == "cuda":
            metrics["perf/gpu_mem_alloc_gib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            metrics["perf/gpu_mem_reserved_gib"] = torch.cuda.max_memory_reserved(pl_module.device) / 2**30
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=images)
        self._reset_window()


class GradNormMonitor(Callback):
    """Logs the total gradient norm before clipping and stops training on a non-finite one, without a host sync per step.

    Every step folds "this norm is not finite" into three numbers on the device: [seen, first bad step, its norm]. Every
    `check_every` steps they are copied to pinned host memory without blocking, behind a CUDA event, and the copy started
    at the previous check is read: it arrived long ago, so the read waits for nothing. A non-finite norm at step s thus
    raises at step s + 1 with check_every=1 (within 2·check_every steps), on every rank at the same step (each rank
    sees the same all-reduced gradients and reads on the same schedule); a blocking read also runs
    before any checkpoint is written and at the end of training. So a non-finite norm always stops training and no
    checkpoint holds weights updated from it, but the optimiser steps up to the detection do run (on weights that are
    then discarded). `asynchronous=False` reads the device values at each check instead: one host sync per check, and
    the optimiser step of a non-finite norm never runs.
    """

    def __init__(self, norm_type: float = 2.0, check_every: int = 1, raise_on_nonfinite: bool = True,
                 asynchronous: bool = True):
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.norm_type, self.check_every, self.raise_on_nonfinite = float(norm_type), int(check_every), raise_on_nonfinite
        self.asynchronous = asynchronous
        self._reset()

    def _reset(self) -> None:
        self._state: torch.Tensor | None = None  # (3,) float64 on the device: [seen, first bad step, its norm]
        self._host: torch.Tensor | None = None  # pinned copy of _state, in flight since the last check
        self._event: Any = None  # CUDA event recorded after that copy (None on CPU, where copies are synchronous)
        self._pending = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        # Lightning calls this after AMP unscaling and before gradient clipping: the norm that clipping sees.
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return
        norm = torch.nn.utils.get_total_norm(grads, norm_type=self.norm_type)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor; full_tensor is a collective, not a host sync
            norm = norm.full_tensor()
        pl_module.log("optim/grad_norm", norm, on_step=True, on_epoch=False, batch_size=1)
        if not self.raise_on_nonfinite:
            return
        step = trainer.global_step
        if self._state is None:
            self._state = torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64, device=norm.device)
        # Device-side only: keep the first non-finite step and its norm.
        first = ~torch.isfinite(norm) & (self._state[0] == 0)
        mark = torch.stack([torch.ones((), dtype=torch.float64, device=norm.device),
                            torch.full((), float(step), dtype=torch.float64, device=norm.device),
                            norm.detach().to(torch.float64)])
        self._state = torch.where(first, mark, self._state)
        if step % self.check_every == 0:
            self._check(trainer)

    def _check(self, trainer: Trainer) -> None:
        assert self._state is not None
        if not self.asynchronous:
            self._raise_if_seen(self._state.tolist(), trainer)  # blocking: one host sync
            return
        if self._pending:
            if self._event is not None:
                self._event.synchronize()  # the copy of the previous check: long done, nothing to wait for
            self._raise_if_seen(self._host.tolist(), trainer)  # a read of host memory, no device sync
        cuda = self._state.is_cuda
        if self._host is None:
            self._host = torch.empty(3, dtype=torch.float64, pin_memory=cuda)
        self._host.copy_(self._state, non_blocking=cuda)
        if cuda:
            self._event = torch.cuda.Event()
            self._event.record()
        self._pending = True

    def _flush(self, trainer: Trainer) -> None:
        """Blocking read of everything seen so far (before a checkpoint is written, at the end of training)."""
        if self.raise_on_nonfinite and self._state is not None:
            self._raise_if_seen(self._state.tolist(), trainer)

    def _raise_if_seen(self, state: list[float], trainer: Trainer) -> None:
        seen, step, norm = state
        if seen:
            late = int(step) != trainer.global_step
            raise FloatingPointError(
                f"non-finite gradient norm {norm} at step {int(step)} (rank {trainer.global_rank}) with a finite loss"
                + (f", detected at step {trainer.global_step} (the optimiser steps in between ran; no checkpoint was "
                   "written after it)" if late else "")
                + ": lower the lr, check bf16 overflow, or look at that step's batch keys"
            )

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self._flush(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)


class PackLog(Callback):
    """Appends {"rank", "step", "epoch", "keys", "tokens"} per training batch to `<dirpath>/packs_rank<r>.jsonl`
    (data audit: which images each step saw, e.g. across a resume on another process count)."""

    def __init__(self, dirpath: str = "pack_logs"):
        self.dirpath = Path(dirpath)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        record = {"rank": trainer.global_rank, "step": trainer.global_step, "epoch": trainer.current_epoch,
                  "keys": list(batch.keys), "tokens": batch.num_tokens}
        with open(self.dirpath / f"packs_rank{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps(record) + "\n")


class DataHealthMonitor(Callback):
    """Per epoch, what the loader delivered against the epoch's plan and what `on_error=skip` took out: to the logger
    and as one summary line.

    Logs under `train_data/` (`val_data/` for validation), summed over ranks, from the datamodule's `LoaderStats`:
    `epoch_samples_delivered` (samples of the packs delivered this epoch, skipped ones included), `epoch_samples_planned`
    (all samples of the epoch's plan; train only), `epoch_fraction_delivered` (packs delivered / packs planned: below 1
    in the last epoch when max_steps stops it, which is not lost data), `skipped_samples`, `skipped_shards`,
    `skipped_fraction`. The group sorts after loss/, lr, optim/ and perf/ in TensorBoard. The limit itself
    (`max_skipped_fraction`, default 1%) is enforced by the loader, so it holds without this callback.
    """

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "train", "train_data/")

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._report(trainer, pl_module, "val", "val_data/")

    def _report(self, trainer: Trainer, pl_module: LightningModule, kind: str, prefix: str) -> None:
        stats = getattr(trainer.datamodule, "stats", {}).get(kind)
        if stats is None:
            return
        local = torch.tensor([stats.skipped_samples, stats.planned_samples, stats.images, stats.packs],
                             dtype=torch.float64, device=pl_module.device)
        skipped, planned, images, packs = (float(v) for v in trainer.strategy.reduce(local, reduce_op="sum").tolist())
        names = set(stats.skipped_shard_names)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, sorted(names))  # a shard damaged on two ranks counts once
            names = {name for part in gathered for name in part}
        fraction = skipped / planned if planned else 0.0
        metrics = {f"{prefix}epoch_samples_delivered": planned, f"{prefix}skipped_samples": skipped,
                   f"{prefix}skipped_shards": float(len(names)), f"{prefix}skipped_fraction": fraction}
        plan = getattr(trainer.datamodule, "plan_report", None) if kind == "train" else None
        if plan:  # the whole epoch's plan: a shorter last epoch reads as a fraction below 1, not as lost samples
            metrics[f"{prefix}epoch_samples_planned"] = float(plan["kept_samples"])
            metrics[f"{prefix}epoch_fraction_delivered"] = float(stats.packs) / max(1, int(plan["packs_per_rank"]))
        for name, value in metrics.items():  # already global sums: no sync_dist
            pl_module.log(name, value, on_step=False, on_epoch=True, rank_zero_only=True, batch_size=1)
        if trainer.global_rank != 0:
            return
        line = (f"{kind} epoch {stats.epoch} data: {int(images)} of {int(planned)} samples in the {int(packs)} packs "
                f"delivered; {int(skipped)} skipped ({fraction:.2%}) from {len(names)} shards"
                + (f"; the epoch's plan: {plan['kept_samples']} samples, {plan['packs_per_rank']} packs per rank"
                   if plan else ""))
        if names:
            shown = sorted(names)
            log.warning("%s (%s%s; limit max_skipped_fraction=%g)", line, ", ".join(shown[:5]),
                        ", …" if len(shown) > 5 else "", getattr(trainer.datamodule, "max_skipped_fraction", float("nan")))
        else:
            log.info("%s", line)
