"""The network, pure torch (no Lightning, no training code): what turns a packed token sequence into velocities.

nit.py (NiT, NiTConfig, presets, build_nit), attention.py (packed attention backends), rope.py (axial 2D RoPE),
packed.py (PackedMeta: cu_seqlens, RoPE tables, instance ids, built once per forward), patching.py (latents <->
packed tokens), official.py (the official checkpoints' names), flops.py (FLOP counts for MFU).
"""
from __future__ import annotations

from nit_lightning.models.nit import PRESETS, NiT, NiTConfig, build_nit
from nit_lightning.models.official import load_official_checkpoint, official_state_dict
from nit_lightning.models.packed import PackedMeta

__all__ = ["NiT", "NiTConfig", "PRESETS", "build_nit", "load_official_checkpoint", "official_state_dict", "PackedMeta"]
