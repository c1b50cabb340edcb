"""REPA: the block it aligns after, and the frozen encoder (a local torch module giving one feature row per latent token,
called by the training step)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Block after which REPA aligns hidden states, per preset (SPEC §3: S/B 4, L 6, XL/XXL 8).
REPA_LAYER_BY_PRESET = {"NiT-S": 4, "NiT-B": 4, "NiT-L": 6, "NiT-XL": 8, "NiT-XXL": 8, "NiT-T2I": 8}  # T2I: XL-sized


def repa_layer_for(net: torch.nn.Module, preset: str, weight: float, layer: int | None) -> int | None:
    """The block REPA aligns after (None when REPA is off); with REPA off, the net's projector is frozen (unused
    parameters would make DDP fail: "did not receive gradients")."""
    if weight <= 0:
        if net.projector is not None:
            net.projector.requires_grad_(False)
            log.info("REPA is off (repa_weight=0): the net's projector is frozen and not trained")
        return None
    if net.projector is None:
        raise ValueError("REPA is on (repa_weight > 0) but the net has no projector: set model.net.projector_dim "
                         "to the encoder's feature size (e.g. 1280 for RADIO-v2.5-H)")
    if layer is None:
        layer = REPA_LAYER_BY_PRESET.get(preset)
        if layer is None:
            raise ValueError(f"no default REPA layer for {preset!r}: set model.repa_layer")
    if not 1 <= layer <= net.config.depth:
        raise ValueError(f"repa_layer={layer} is outside 1..depth={net.config.depth}")
    return layer
from nit_lightning.records.names import WEIGHTS_DOCS


class LocalTorchEncoder:
    """A frozen ViT from a local TorchScript (or torch.save'd nn.Module) file, aligned one encoder patch per token.

    The latents are decoded to images with the data's codec, each image is resized to (h·e, w·e) pixels (e = the
    encoder's patch size, so the encoder's patch grid equals the token grid h×w), mapped to [0, 1], and the module must
    return its patch features as (1, h·w, z_dim) (row-major) or (1, z_dim, h, w). Normalisation is the module's job.
    """

    def __init__(self, module: torch.nn.Module, codec: Any, patch_size: int, encoder_patch: int, z_dim: int):
        self.module = module.eval().requires_grad_(False)
        self.codec, self.patch_size, self.encoder_patch, self.z_dim = codec, patch_size, encoder_patch, z_dim

    @torch.no_grad()
    def __call__(self, x_ND: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
        from nit_lightning.models.patching import unpack_latents

        latents = unpack_latents(x_ND, hw.cpu(), self.codec.latent_channels, self.patch_size)
        feats = []
        for latent, (h, w) in zip(latents, hw.tolist()):  # per image: sizes differ; REPA is an optional, slow path
            image = self.codec.decode(latent[None].float())  # (1, 3, H, W) in [-1, 1]
            image = F.interpolate(image, size=(h * self.encoder_patch, w * self.encoder_patch), mode="bicubic",
                                  align_corners=False).clamp(-1, 1)
            z = self.module((image + 1) / 2)
            if z.ndim == 4:  # (1, z, h, w) -> (1, h·w, z)
                z = z.flatten(2).transpose(1, 2)
            if z.shape != (1, h * w, self.z_dim):
                raise ValueError(f"encoder returned {tuple(z.shape)} for a {h}×{w} token grid; expected (1, {h * w}, "
                                 f"{self.z_dim}): check encoder_patch={self.encoder_patch} and z_dim")
            feats.append(z[0])
        return torch.cat(feats, dim=0).to(x_ND.dtype)


def load_repa_encoder(
    spec: str, *, codec: dict[str, Any] | None, patch_size: int, device: torch.device | str = "cpu"
) -> LocalTorchEncoder:
    """Encoder from "path.pt[:encoder_patch[:z_dim]]" (defaults 16 and the output width found on a probe)."""
    from nit_lightning.data.codecs import codec_from_description

    path, *rest = spec.split(":")
    if not Path(path).exists():
        raise FileNotFoundError(
            f"REPA encoder {path!r} not found: export the frozen encoder (e.g. RADIO-v2.5 via torch.jit.trace) to a "
            f"local .pt file and pass model.repa_encoder=/path/to/encoder.pt[:patch_size] ({WEIGHTS_DOCS})"
        )
    if codec is None:
        raise ValueError("REPA features from an encoder need the data's codec to decode latents; the datamodule has none")
    try:
        module = torch.jit.load(path, map_location=device)
    except RuntimeError:
        module = torch.load(path, map_location=device, weights_only=False)
    if not isinstance(module, torch.nn.Module) and not isinstance(module, torch.jit.ScriptModule):
        raise TypeError(f"{path} holds a {type(module).__name__}, not a module; save the whole encoder module")
    encoder_patch = int(rest[0]) if rest else 16
    with torch.no_grad():
        probe = module(torch.zeros(1, 3, encoder_patch, encoder_patch, device=device))
    z_dim = int(rest[1]) if len(rest) > 1 else int(probe.shape[1] if probe.ndim == 4 else probe.shape[-1])
    return LocalTorchEncoder(module, codec_from_description(codec, device=device), patch_size, encoder_patch, z_dim)
