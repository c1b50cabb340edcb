"""Sharded training for the large presets (XL/XXL): FSDP2 per NiT block, selectable from YAML, and an EMA per shard.

YAML (`trainer.strategy`):
  class_path: nit_lightning.training.strategies.NiTFSDP2Strategy     # FSDP2 `fully_shard` per block
  init_args: {param_dtype: bfloat16, reshard_after_forward: true}
Use `ShardedEMA` in place of `EMA` with NiTFSDP2Strategy: it keeps the EMA as DTensor shards like the parameters and
gathers full tensors only when a checkpoint is written.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy

from nit_lightning.records.checkpoint import store_ema_weights
from nit_lightning.records.names import dtype_from_name
from nit_lightning.training.ema import EMA, unwrap_net

log = logging.getLogger(__name__)

DEFAULT_BLOCK = "auto"  # the class of net.blocks[0]: NiTBlock for NiT, NiTT2IBlock for NiT-T2I


def resolve_class(path: str) -> type[torch.nn.Module] | None:
    """`package.module.Class` -> the class ("auto" -> None: the net's own block class); a clear error when it does not
    exist."""
    if path == "auto":
        return None  # type: ignore[return-value]  # resolved from the net in shard_per_block
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"block class {path!r} not found ({error}); pass e.g. block_class: auto or "
                         "nit_lightning.models.nit.NiTBlock") from error
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"block class {path!r} is {cls!r}, not an nn.Module subclass")
    return cls


def resolve_dtype(name: str | None, where: str = "dtype",
                  allowed: tuple[str, ...] = ("bfloat16", "float16", "float32")) -> torch.dtype | None:
    """'bfloat16' / 'float32' / ... -> torch dtype (old spellings refused naming the new one); None stays None."""
    return None if name is None else dtype_from_name(name, allowed, where)


def _find_net(pl_module: torch.nn.Module) -> torch.nn.Module:
    net = getattr(pl_module, "net", None)
    if not isinstance(net, torch.nn.Module) or not isinstance(getattr(net, "blocks", None), torch.nn.ModuleList):
        raise AttributeError(f"{type(pl_module).__name__} has no `net` with a `blocks` ModuleList to shard per block")
    return net


def shard_per_block(
    pl_module: torch.nn.Module,
    mesh: Any,
    *,
    block_class: type[torch.nn.Module] | None,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool = True,
) -> int:
    """`fully_shard` every block of `pl_module.net`, then the net, then every other child with trainable params.

    Returns the number of FSDP groups. Fails naming any trainable parameter left outside a group: it would get no
    gradient reduction (ModelParallelStrategy adds no DDP) and silently diverge between ranks.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    net = _find_net(pl_module)
    block_class = block_class or type(net.blocks[0])  # "auto": every block must be of the first one's class
    groups = 0
    for block in net.blocks:
        if not isinstance(block, block_class):
            raise TypeError(f"net.blocks holds {type(block).__name__}, expected {block_class.__name__}")
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        groups += 1
    # the root group (embedders, final layer) stays unsharded after forward: backward needs it first (torchtitan).
    fully_shard(net, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    groups += 1
    for name, child in pl_module.named_children():
        if child is net or not any(p.requires_grad for p in child.parameters()):
            continue
        fully_shard(child, mesh=mesh, mp_policy=policy, reshard_after_forward=False)  # e.g. the REPA projector
        groups += 1
        log.info("FSDP2: sharded %s as its own group", name)
    loose = [n for n, p in pl_module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if loose:
        raise RuntimeError(f"trainable parameters outside any FSDP group: {loose[:8]}; shard their module too")
    return groups


class NiTFSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy (data parallel only) applying FSDP2 `fully_shard` per NiT block before Lightning's setup.

    Per-block activation checkpointing stays with the module (`model.activation_checkpointing: true`), which wraps
    `block.forward` without renaming parameters. Checkpoints default to one full file (generation reads files).
    """

    def __init__(
        self,
        block_class: str = DEFAULT_BLOCK,
        param_dtype: str = "bfloat16",
        reduce_dtype: str = "float32",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,  # dp size set in setup_environment
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.block_class = resolve_class(block_class)
        self.param_dtype = resolve_dtype(param_dtype, "param_dtype")
        self.reduce_dtype = resolve_dtype(reduce_dtype, "reduce_dtype", ("bfloat16", "float32"))
        self.reshard_after_forward = reshard_after_forward
        self.num_groups = 0

    def setup_environment(self) -> None:
        # pure data parallel: Lightning's "auto" would make the data-parallel size the node count (and TP the rest)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer: Trainer) -> None:
        assert self.lightning_module is not None
        if not any(_is_dtensor(p) for p in self.lightning_module.parameters()):  # the module may shard itself
            mesh = self.device_mesh["data_parallel"]
            self.num_groups = shard_per_block(
                self.lightning_module, mesh, block_class=self.block_class, param_dtype=self.param_dtype,
                reduce_dtype=self.reduce_dtype, reshard_after_forward=self.reshard_after_forward)
            log.info("FSDP2: %d groups over %d ranks", self.num_groups, mesh.size())
        super().setup(trainer)


def _is_dtensor(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def gather_full(state: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """DTensor shards -> full tensors on `device`, one tensor at a time (peak extra memory: the largest tensor).

    A collective: every rank must call it with the same keys in the same order.
    """
    return {k: (v.full_tensor() if _is_dtensor(v) else v).detach().to(device) for k, v in state.items()}


class ShardedEMA(EMA):
    """EMA whose shadow is sharded like the parameters (DTensor under FSDP2) and gathered only when saving.

    Per rank it holds 4 bytes/param / world_size; `ema_state_dict` in the checkpoint has full tensors under the net's
    state-dict names (the checkpoint contract), and on resume the full tensors are re-sharded like the parameters.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gathered: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._reshard_like(unwrap_net(pl_module.net))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # ModelParallelStrategy restores callback state *after* on_fit_start (restore_checkpoint_after_setup), so the
        # full tensors of a resumed EMA arrive only now: re-shard them before the first update.
        self._to_device(pl_module.device)
        self._reshard_like(unwrap_net(pl_module.net))

    @torch.no_grad()
    def _reshard_like(self, net: torch.nn.Module) -> None:
        from torch.distributed.tensor import distribute_tensor

        if self.shadow is None:
            return
        for name, live in net.state_dict().items():
            value = self.shadow.get(name)
            if value is not None and _is_dtensor(live) and not _is_dtensor(value):
                full = value.to(device=live.device)
                self.shadow[name] = distribute_tensor(full, live.device_mesh, live.placements)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.shadow is not None:
            # dump_checkpoint calls this on every rank before on_save_checkpoint: one gather serves both.
            self._gathered = gather_full(self.shadow)
            state["shadow"] = self._gathered
        return state

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.shadow is None:
            return
        store_ema_weights(checkpoint, self._gathered if self._gathered is not None else gather_full(self.shadow))
        self._gathered = None
