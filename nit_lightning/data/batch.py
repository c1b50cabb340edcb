"""`PackedBatch`: one pack of variable-size images, the unit every rank consumes per training step."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class PackedBatch:
    """Tokens of B images concatenated without padding; image i owns rows seqlens[:i].sum() .. +seqlens[i]."""

    x: torch.Tensor  # (N, C·p·p) packed latent tokens, each image row-major
    hw: torch.Tensor  # (B, 2) long, token-grid size (h_i, w_i) per image
    y: torch.Tensor  # (B,) long class labels
    seqlens: torch.Tensor  # (B,) long, h_i · w_i
    keys: list[str] = field(default_factory=list)  # source keys, for logging and debugging only
    repa_z: torch.Tensor | None = None  # (N, z_dim) frozen-encoder features per token, when REPA is on
    dropped: list[str] = field(default_factory=list)  # "<dir>/<shard>" of each planned sample left out (on_error=skip)
    captions: list[str] | None = None  # one caption per image in batch order (T2I shards); None: class-conditional

    def __post_init__(self) -> None:
        if self.hw.ndim != 2 or self.hw.shape[1] != 2:
            raise ValueError(f"hw must be (B, 2), got {tuple(self.hw.shape)}")
        if self.y.shape[0] != self.hw.shape[0] or self.seqlens.shape[0] != self.hw.shape[0]:
            raise ValueError(f"y {tuple(self.y.shape)} / seqlens {tuple(self.seqlens.shape)} do not match hw")
        if self.captions is not None and len(self.captions) != self.hw.shape[0]:
            raise ValueError(f"{len(self.captions)} captions for {self.hw.shape[0]} images: one caption per image")

    @property
    def num_images(self) -> int:
        return int(self.hw.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PackedBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return replace(
            self, x=move(self.x), hw=move(self.hw), y=move(self.y), seqlens=move(self.seqlens), repa_z=move(self.repa_z)
        )

    def pin_memory(self) -> "PackedBatch":
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return replace(self, x=pin(self.x), hw=pin(self.hw), y=pin(self.y), seqlens=pin(self.seqlens), repa_z=pin(self.repa_z))
