"""EMA of the network's weights as a Lightning callback: fp32 shadow keyed by the net's own state-dict names."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from nit_lightning.records.checkpoint import ema_weights, store_ema_weights

log = logging.getLogger(__name__)


def unwrap_net(module: torch.nn.Module) -> torch.nn.Module:
    """The plain network under `torch.compile` (`_orig_mod`) and DDP/FSDP-style (`module`) wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):  # torch.compile's OptimizedModule
            module = module._orig_mod
        elif type(module).__name__ in ("DistributedDataParallel", "DataParallel") and hasattr(module, "module"):
            module = module.module
        else:
            return module


class EMA(Callback):
    """Exponential moving average of `pl_module.net`, one update per optimiser step, stored in checkpoints.

    shadow ← decay·shadow + (1 − decay)·param (computed as a lerp by 1 − decay), in fp32 whatever the param dtype;
    buffers are copied, not averaged. With `warmup=True` the decay of update n (0-based) is min(decay, (1+n)/(10+n)).
    """

    def __init__(self, decay: float = 0.9999, warmup: bool = False, validate_with_ema: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}; the paper uses 0.9999")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.validate_with_ema = bool(validate_with_ema)
        self.shadow: dict[str, torch.Tensor] | None = None  # net state-dict name -> fp32 (params) / copy (buffers)
        self.num_updates = 0
        self._last_global_step: int | None = None
        self._swapped = False

    @property
    def state_key(self) -> str:
        return "EMA"

    # ---- maths ---------------------------------------------------------------------------------------------
    def current_decay(self) -> float:
        """Decay used by the next update."""
        if self.warmup:
            n = self.num_updates
            return min(self.decay, (1 + n) / (10 + n))
        return self.decay

    def init_from(self, net: torch.nn.Module) -> None:
        """Start the shadow as an fp32 copy of the net's parameters (and a copy of its buffers)."""
        net = unwrap_net(net)
        params = dict(net.named_parameters())
        self.shadow = {}
        for name, value in net.state_dict().items():
            source = params.get(name, value)
            self.shadow[name] = source.detach().to(torch.float32 if name in params else value.dtype).clone()
        self.num_updates = 0

    @torch.no_grad()
    def update(self, net: torch.nn.Module) -> None:
        """One EMA step from the net's current parameters."""
        net = unwrap_net(net)
        if self.shadow is None:
            self.init_from(net)
        shadow = self.shadow
        assert shadow is not None
        weight = 1.0 - self.current_decay()
        names, targets, sources = [], [], []
        for name, param in net.named_parameters():
            if name not in shadow:
                raise KeyError(f"EMA has no entry {name!r}: the network changed after the EMA was created")
            names.append(name)
            targets.append(shadow[name])
            sources.append(param.detach().to(device=shadow[name].device, dtype=torch.float32))
        if targets:
            torch._foreach_lerp_(targets, sources, weight)  # s += w·(p − s), one fused kernel per dtype/device
        for name, buffer in net.named_buffers():
            if name in shadow:
                shadow[name].copy_(buffer.detach())
        self.num_updates += 1

    def _to_device(self, device: torch.device) -> None:
        if self.shadow is not None:
            self.shadow = {k: v.to(device) for k, v in self.shadow.items()}

    # ---- swapping ------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def swapped_in(self, pl_module: LightningModule | torch.nn.Module) -> Iterator[None]:
        """Run the body with the EMA weights in `pl_module.net` (or in the given net); restore the live ones after."""
        net = unwrap_net(getattr(pl_module, "net", pl_module))
        if self.shadow is None:
            raise RuntimeError("EMA has no weights yet: it is initialised when fitting starts or from a checkpoint")
        if self._swapped:  # nested use: the EMA weights are already in
            yield
            return
        backup = {k: v.detach().clone() for k, v in net.state_dict().items()}
        self._load_into(net, self.shadow)
        self._swapped = True
        try:
            yield
        finally:
            self._load_into(net, backup)
            self._swapped = False

    @staticmethod
    @torch.no_grad()
    def _load_into(net: torch.nn.Module, values: dict[str, torch.Tensor]) -> None:
        state = net.state_dict(keep_vars=True)
        missing = sorted(set(state) - set(values))
        unexpected = sorted(set(values) - set(state))
        if missing or unexpected:
            raise KeyError(f"EMA keys do not match the net: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, target in state.items():
            target.data.copy_(values[name].to(device=target.device, dtype=target.dtype))

    # ---- Lightning hooks -----------------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.shadow is None:  # fresh run; on resume load_state_dict has already filled it
            self.init_from(pl_module.net)
        self._to_device(pl_module.device)
        self._last_global_step = trainer.global_step

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # FSDP / ModelParallel strategies restore callback state after on_fit_start: a resumed shadow would stay on
        # the CPU and every update would copy the parameters there. Move it (a no-op when already in place).
        self._to_device(pl_module.device)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step counts optimiser steps: with accumulate_grad_batches = k it moves once every k batches, and not
        # at all on a skipped (non-finite) step, so the EMA follows the optimiser exactly.
        if self._last_global_step is None or trainer.global_step > self._last_global_step:
            self.update(pl_module.net)
            self._last_global_step = trainer.global_step

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.validate_with_ema and self.shadow is None:
            self._load_for_evaluation(trainer)
        if self.validate_with_ema and self.shadow is not None and not self._swapped:
            self._validation_ctx = self.swapped_in(pl_module)
            self._validation_ctx.__enter__()

    def _load_for_evaluation(self, trainer: Trainer) -> None:
        """`validate`/`test` do not restore callback states (Lightning does that only when fitting): read the EMA
        weights from the checkpoint being evaluated, or say loudly that the live weights are used."""
        path = getattr(trainer, "ckpt_path", None)
        if path:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
            self.shadow = ema_weights(checkpoint)
            if self.shadow is not None:
                log.info("validating with the EMA weights of %s", path)
                return
        log.warning("EMA has no weights (checkpoint %s has no ema_state_dict): validating with the live weights", path)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        ctx = getattr(self, "_validation_ctx", None)
        if ctx is not None:
            self._validation_ctx = None
            ctx.__exit__(None, None, None)

    # `test` and `predict` evaluate the EMA weights too, exactly as validation does.
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_validation_start(trainer, pl_module)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_validation_end(trainer, pl_module)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_validation_start(trainer, pl_module)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.on_validation_end(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "num_updates": self.num_updates, "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("decay", self.decay) != self.decay:
            log.warning("EMA decay changed on resume: checkpoint %s, now %s", state_dict["decay"], self.decay)
        self.shadow = state_dict["shadow"]
        self.num_updates = int(state_dict["num_updates"])

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        # The same tensors as the callback state: torch.save stores each storage once, so this costs no space.
        if self.shadow is not None:
            store_ema_weights(checkpoint, self.shadow)

    def export_safetensors(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        """Write the EMA weights (net state-dict names) as a safetensors file."""
        from safetensors.torch import save_file

        if self.shadow is None:
            raise RuntimeError("EMA has no weights to export yet")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.shadow.items()}, str(path), metadata=metadata)
        return path
