"""Pure-torch network code: NiT, its presets, packed attention, axial RoPE, official checkpoint loading."""
from __future__ import annotations

from nit_lightning.models.nit import PRESETS, NiT, NiTConfig, build_nit
from nit_lightning.models.official import load_official_checkpoint, official_state_dict
from nit_lightning.models.packed import PackedMeta

__all__ = ["NiT", "NiTConfig", "PRESETS", "build_nit", "load_official_checkpoint", "official_state_dict", "PackedMeta"]
