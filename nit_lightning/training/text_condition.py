"""The caption side of NiT-T2I training: a frozen text encoder turning a batch's captions into the PackedText the net
takes, with caption dropout for classifier-free guidance.

The encoder is not a submodule of the LightningModule: its weights are never trained, never in the optimiser and never
in the checkpoint's state dict; the checkpoint records its description (path + sha256) instead, and sampling rebuilds
it from there. A dropped caption becomes the null caption (length 0, no token): the image's cross-attention sees no
key and adds 0, the same unconditional branch the sampler's guidance uses (docs/t2i.md explains the choice).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from nit_lightning.data.text_encoders import TextEncoder, text_encoder_from_description, text_encoder_from_spec
from nit_lightning.models.text import PackedText

log = logging.getLogger(__name__)

CACHE_FLOATS = 1 << 26  # 256 MB of fp32 caption tokens kept on the host: a small captioned set is encoded once


class TextConditioner:
    """captions (+ which to drop) -> PackedText on a device; encodings of repeated captions are cached on the host."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.encoder: TextEncoder = text_encoder_from_spec(spec)
        self._cache: dict[str, torch.Tensor] = {}
        self._cached_floats = 0

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    def describe(self) -> dict[str, Any]:
        return self.encoder.describe()

    def _on(self, device: torch.device) -> TextEncoder:
        """The encoder on `device` (rebuilt there once from its description: a 1B-parameter encoder runs on the GPU)."""
        if device.type != "cpu" and getattr(self.encoder, "device", torch.device("cpu")) != device:
            self.encoder = text_encoder_from_description(self.encoder.describe(), device=device)
        return self.encoder

    def encode(self, captions: Sequence[str], device: torch.device) -> list[torch.Tensor]:
        """(L_i, E) float32 host tensors, one per caption, from the cache or the encoder (new captions in one call)."""
        new = sorted({c for c in captions if c not in self._cache})
        fresh: dict[str, torch.Tensor] = {}
        if new:
            encoded = self._on(device).encode(new)
            fresh = dict(zip(new, encoded.tokens.detach().float().cpu().split(encoded.lengths.tolist())))
            for caption, tokens in fresh.items():
                if self._cached_floats + tokens.numel() <= CACHE_FLOATS:
                    self._cache[caption] = tokens
                    self._cached_floats += tokens.numel()
        return [self._cache[c] if c in self._cache else fresh[c] for c in captions]

    def condition(self, captions: Sequence[str | None] | None, drop: torch.Tensor | None, device: torch.device,
                  where: str = "the batch") -> PackedText:
        """The PackedText of a batch: caption i, or the null caption where drop[i] (caption dropout)."""
        if captions is None or any(c is None for c in captions):
            missing = "every image" if captions is None else f"{sum(c is None for c in captions)} images"
            raise ValueError(f"{where}: {missing} without a caption; a NiT-T2I run needs captioned shards "
                             "(prepare --captions, docs/t2i.md)")
        keep = [True] * len(captions) if drop is None else (~drop.cpu()).tolist()
        kept = self.encode([c for c, k in zip(captions, keep) if k], device)
        parts, it = [], iter(kept)
        for k in keep:
            parts.append(next(it) if k else torch.zeros(0, self.dim))
        return PackedText.from_list(parts, dim=self.dim).to(device, non_blocking=True)


def text_conditioner_for(net: dict[str, Any], spec: str | None, t2i_presets: dict) -> TextConditioner | None:
    """NiT-T2I presets need a text encoder (whose width fills in net.text_dim); class-conditional ones take none."""
    if net["name"] not in t2i_presets:
        if spec is not None:
            raise ValueError(f"model.text_encoder={spec!r} is set but {net['name']!r} is a class-conditional preset; use "
                             f"a NiT-T2I preset ({', '.join(sorted(t2i_presets))}) or drop model.text_encoder")
        return None
    if spec is None:
        raise ValueError(f"{net['name']!r} is text-to-image: set model.text_encoder (hf:PATH or tinytext:PATH)")
    text = TextConditioner(spec)
    given = net.get("text_dim")
    if given is not None and int(given) != text.dim:
        raise ValueError(f"model.net.text_dim={given} but the text encoder {spec} gives {text.dim}-wide tokens; drop "
                         "model.net.text_dim (it is filled in from the encoder)")
    net["text_dim"] = text.dim
    return text
