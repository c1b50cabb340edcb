"""The network, pure torch (no Lightning, no training code): what turns a packed token sequence into velocities.

nit.py (NiT, NiTConfig, presets, build_nit), nit_t2i.py (NiT-T2I: NiTT2I, NiTT2IConfig, T2I_PRESETS, build_nit_t2i),
blocks.py / t2i_blocks.py (their blocks), attention.py (packed attention backends), cross_attention.py (packed
cross-attention: image i to caption i), text.py (PackedText: the caption tokens of a pack; TextMeta), rope.py (axial 2D
RoPE), packed.py (PackedMeta: cu_seqlens, RoPE tables, instance ids, built once per forward), patching.py (latents <->
packed tokens), official.py (the official checkpoints' names), flops.py (FLOP counts for MFU).
"""
from __future__ import annotations

from nit_lightning.models.nit import PRESETS, NiT, NiTConfig, build_nit
from nit_lightning.models.nit_t2i import T2I_PRESETS, NiTT2I, NiTT2IConfig, build_nit_t2i
from nit_lightning.models.official import load_official_checkpoint, official_state_dict
from nit_lightning.models.packed import PackedMeta
from nit_lightning.models.text import PackedText

__all__ = ["NiT", "NiTConfig", "PRESETS", "build_nit", "NiTT2I", "NiTT2IConfig", "T2I_PRESETS", "build_nit_t2i",
           "PackedText", "load_official_checkpoint", "official_state_dict", "PackedMeta"]
