"""torch.compile applied from outside the network (DESIGN: per block, like activation checkpointing), or to all blocks.

Modes: "none"; "blocks" compiles every block in place (one graph per block; what FSDP2 per-block sharding and DDP's
bucketed all-reduce overlap expect); "model" compiles `NiT.forward_packed`, everything after the packed metadata
(embeddings, all blocks, final layer) as one graph, so Inductor can fuse across block boundaries and the per-block
guard checks are paid once. Neither renames parameters: state-dict and EMA keys stay `blocks.i.*`, never `_orig_mod.`.

Trade-offs of "model": compile time grows with depth (28 blocks for NiT-XL are unrolled); gradients come out of one
compiled backward, so DDP's all-reduce starts after the whole backward instead of overlapping it; FSDP's per-block
hooks do not belong inside one graph, so NiTModule refuses "model" with the FSDP strategies (use "blocks").
"""
from __future__ import annotations

import torch

COMPILE_MODES = ("none", "blocks", "model")


def resolve_compile_mode(compile: str | None, compile_blocks: bool = False) -> str:
    """The compile mode from the `compile` switch and the older `compile_blocks` flag (true means "blocks")."""
    if compile is None:
        return "blocks" if compile_blocks else "none"
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r} is not one of {list(COMPILE_MODES)}")
    if compile_blocks and compile != "blocks":
        raise ValueError(f"compile_blocks=true and compile={compile!r} disagree; set only compile "
                         f"(one of {list(COMPILE_MODES)}; compile_blocks=true is the old spelling of compile=blocks)")
    return compile


def compile_net(net: torch.nn.Module, mode: str, *, backend: str = "inductor", dynamic: bool | None = True) -> None:
    """Compile `net` in place in `mode`; parameters keep their names. Apply activation checkpointing first."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {list(COMPILE_MODES)}")
    if mode == "none":
        return
    if mode == "blocks":
        blocks = getattr(net, "blocks", None)
        if blocks is None:
            raise AttributeError(f"{type(net).__name__} has no `blocks` ModuleList to compile per block")
        for block in blocks:
            block.compile(dynamic=dynamic, backend=backend)  # in place: keys stay `blocks.i.*`
        return
    if not callable(getattr(net, "forward_packed", None)):
        raise AttributeError(f"{type(net).__name__} has no `forward_packed` to compile as one graph; use compile=blocks")
    # An instance attribute shadows the method: the module tree and its parameter names do not change.
    net.forward_packed = torch.compile(net.forward_packed, dynamic=dynamic, backend=backend)
