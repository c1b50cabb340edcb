"""Small random networks and checkpoints for the tests: a NiT-debug with spread-out weights (an untrained NiT outputs
exactly 0), written the way NiTModule + EMA write Lightning checkpoints (docs/architecture.md)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nit_lightning.data.codecs import PixelCodec
from nit_lightning.models import NiT, build_nit
from nit_lightning.records.checkpoint import CheckpointMeta, store_ema_weights


def random_debug_net(num_classes: int = 3, in_channels: int = 12, seed: int = 0) -> NiT:
    """NiT-debug for PixelCodec(2) latents (12 channels) with N(0, 0.1) weights: non-constant images from the start."""
    torch.manual_seed(seed)
    net = build_nit("NiT-debug", in_channels=in_channels, num_classes=num_classes)
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    return net


def write_lightning_checkpoint(path: Path, net: NiT, *, ema: bool = True, live_offset: float = 0.0) -> Path:
    """What `load_pipeline` reads: nit_meta, `net.`-prefixed live weights (+ offset, + one non-net key), EMA weights."""
    state = {k: v.clone() for k, v in net.state_dict().items()}
    checkpoint = {
        "state_dict": {f"net.{k}": v + live_offset for k, v in state.items()},
        "global_step": 7,
    }
    checkpoint["state_dict"]["loss_fn.some_buffer"] = torch.zeros(1)  # non-net keys are ignored and counted
    if ema:
        store_ema_weights(checkpoint, state)
    CheckpointMeta(net_config=dataclasses.asdict(net.config), codec=PixelCodec(2).describe(), step=7).store(checkpoint)
    torch.save(checkpoint, path)
    return path


class CountHostSyncs(TorchDispatchMode):
    """Counts aten::_local_scalar_dense: the op behind .item()/bool()/float() of a tensor, a host sync on a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))
