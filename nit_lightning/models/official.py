"""Official NiT safetensors <-> our NiT (SPEC §9): names are equal except x_embedder.proj (conv (D,C,p,p) vs Linear)."""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nit_lightning.models.nit import NiT, NiTConfig

log = logging.getLogger(__name__)

CONV_KEY = "x_embedder.proj.weight"
PROJECTOR_PREFIX = "projector."


@dataclass
class OfficialLoadReport:
    """What `load_official_checkpoint` did: every key accounted for."""

    path: str
    loaded: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)  # conv kernels flattened into Linear weights
    skipped_projector: list[str] = field(default_factory=list)  # REPA projector keys the model has no room for
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        s = f"{self.path}: loaded {len(self.loaded)} tensors ({len(self.reshaped)} reshaped)"
        if self.skipped_projector:
            s += f", skipped {len(self.skipped_projector)} REPA projector tensors (model has no projector)"
        return s + "".join(f"; warning: {w}" for w in self.warnings)


def official_state_dict(model: NiT) -> dict[str, torch.Tensor]:
    """Our state dict under the official names and shapes (x_embedder.proj.weight as a (D, C, p, p) conv)."""
    cfg = model.config
    sd = {k: v for k, v in model.state_dict().items()}
    w = sd[CONV_KEY]
    sd[CONV_KEY] = w.reshape(w.shape[0], cfg.in_channels, cfg.patch_size, cfg.patch_size)
    return sd


def official_to_ours(state: dict[str, torch.Tensor], config: NiTConfig) -> dict[str, torch.Tensor]:
    """Official names/shapes -> ours: flatten the (D, C, p, p) conv kernel into a (D, C·p·p) Linear weight."""
    out = dict(state)
    if CONV_KEY in out and out[CONV_KEY].ndim == 4:
        w = out[CONV_KEY]
        out[CONV_KEY] = w.reshape(w.shape[0], -1)  # (D, C, p, p) -> (D, C·p·p), channel order (C, p, p) as patchify
    return out


def _read(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"official NiT checkpoint {str(path)!r} not found; download the EMA weights (a model.safetensors file: the "
            "NiT-XL release names them model_1000K.safetensors and model_1500K.safetensors) and pass their local path "
            "(README.md, section 'Real weights and data')"
        )
    from safetensors.torch import load_file

    return load_file(str(path))


def load_official_checkpoint(model: NiT, path: str | Path | dict[str, torch.Tensor]) -> OfficialLoadReport:
    """Strictly load official safetensors (or an already-read dict) into `model`; raises listing every bad key."""
    state = path if isinstance(path, dict) else _read(path)
    report = OfficialLoadReport(path="<dict>" if isinstance(path, dict) else str(path))
    state = official_to_ours(state, model.config)
    if CONV_KEY in state:
        report.reshaped.append(CONV_KEY)
    ours = model.state_dict()
    if model.projector is None:
        report.skipped_projector = sorted(k for k in state if k.startswith(PROJECTOR_PREFIX))
        state = {k: v for k, v in state.items() if not k.startswith(PROJECTOR_PREFIX)}
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(ours[k].shape)}"
        for k in set(ours) & set(state)
        if state[k].shape != ours[k].shape
    )
    if missing or unexpected or mismatched:
        raise RuntimeError(
            f"official checkpoint {report.path} does not match the model {_describe(model.config)}:\n"
            f"  missing ({len(missing)}): {missing}\n  unexpected ({len(unexpected)}): {unexpected}\n"
            f"  shape mismatch ({len(mismatched)}): {mismatched}\n"
            "Build the net with the checkpoint's architecture (see config_from_official)."
        )
    model.load_state_dict(state, strict=True)
    report.loaded = sorted(state)
    if report.skipped_projector:
        log.warning(
            "skipped %d REPA projector tensors from %s (the model has no projector; set projector_dim to keep them)",
            len(report.skipped_projector), report.path,
        )
    if model.config.rope_layout != "reference":
        msg = "official weights were trained with rope_layout='reference'; this model uses 'rowcol' and will sample badly"
        report.warnings.append(msg)
        log.warning(msg)
    return report


def _describe(cfg: NiTConfig) -> str:
    return f"(depth {cfg.depth}, hidden {cfg.hidden_size}, heads {cfg.num_heads}, classes {cfg.num_classes})"


def config_from_official(path: str | Path | dict[str, torch.Tensor], **overrides) -> NiTConfig:
    """Infer the NiTConfig (rope_layout='reference') of an official checkpoint from its tensor names and shapes."""
    state = path if isinstance(path, dict) else _read(path)
    try:
        w = state[CONV_KEY]
        d = w.shape[0]
        in_ch, p = (w.shape[1], w.shape[2]) if w.ndim == 4 else (w.shape[1], 1)
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
        head_dim = state["blocks.0.attn.q_norm.weight"].shape[0]
        mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
    except (KeyError, ValueError) as e:
        raise RuntimeError(f"cannot infer a NiT config from the checkpoint: missing or odd tensor ({e})") from e
    rank = state["blocks.0.adaLN_modulation.1.weight"].shape[0] if "blocks.0.adaLN_modulation.2.weight" in state else None
    proj = state.get("projector.4.weight")
    kw = dict(
        depth=depth, hidden_size=d, num_heads=d // head_dim, mlp_ratio=mlp_hidden / d, in_channels=in_ch, patch_size=p,
        num_classes=num_classes, rope_layout="reference", modulation_rank=rank,
        projector_dim=None if proj is None else proj.shape[0],
        projector_hidden=2048 if proj is None else state["projector.0.weight"].shape[0],
    )
    return NiTConfig(**{**kw, **overrides})
