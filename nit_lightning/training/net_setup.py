"""The network a NiTModule trains, built from its config: the preset with the data's latent channels filled in, official
weights loaded before training, and per-block activation checkpointing applied from outside the network (DESIGN)."""
from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)


def net_config_for_data(net: dict[str, Any], latent_channels: int | None) -> dict[str, Any]:
    """`net` ({"name": preset, **overrides}) with `in_channels` filled in from the data's latents, which it must
    match when given."""
    net = dict(net)
    if "name" not in net:
        raise ValueError(f"model.net needs a preset 'name' (e.g. NiT-B, NiT-debug), got keys {sorted(net)}")
    if latent_channels is not None:
        given = net.get("in_channels")
        if given is not None and int(given) != int(latent_channels):
            raise ValueError(
                f"model.net.in_channels={given} but the data's latents have {latent_channels} channels; "
                "drop model.net.in_channels (it is filled in from the data) or point data at matching shards"
            )
        net["in_channels"] = int(latent_channels)
    return net


def init_from_official(net: torch.nn.Module, path: str) -> None:
    """Load official NiT safetensors strictly into `net` (SPEC §9), logging what was loaded."""
    from nit_lightning.models.official import load_official_checkpoint

    if getattr(net.config, "rope_layout", None) != "reference":
        log.warning("init_from=%s with rope_layout=%r: official weights were trained with rope_layout "
                    "'reference' (SPEC §1.1)", path, getattr(net.config, "rope_layout", None))
    log.info("init_from %s: %s", path, load_official_checkpoint(net, path))


def checkpoint_blocks(net: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing per block of `net.blocks` (recomputed in backward). An instance
    attribute overrides `forward` without renaming parameters: state-dict keys stay `blocks.i.*`."""
    blocks = getattr(net, "blocks", None)
    if blocks is None:
        raise AttributeError("the network has no `blocks` ModuleList to checkpoint")
    for block in blocks:
        block.forward = _checkpointed(block.forward)


def _checkpointed(forward: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run
