"""The text condition of NiT-T2I: `PackedText` (caption tokens of B images, no padding) and `TextMeta` (its key offsets
for packed cross-attention, built once per forward)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from nit_lightning.models.attention import equal_length_runs


@dataclass
class PackedText:
    """Caption tokens of B images concatenated: caption i owns rows lengths[:i].sum() .. +lengths[i] of `tokens`.

    `tokens` (M, E) are a frozen text encoder's hidden states (E = its width, M = Σ lengths); a caption of length 0 is
    the null caption (classifier-free guidance): its image's cross-attention sees no key and outputs 0.
    This is what NiTT2I takes where NiT takes class labels `y`.
    """

    tokens: torch.Tensor  # (M, E)
    lengths: torch.Tensor  # (B,) long, tokens per caption, 0 = null caption

    def __post_init__(self) -> None:
        if self.tokens.ndim != 2:
            raise ValueError(f"caption tokens must be packed (M, E), got shape {tuple(self.tokens.shape)}")
        if self.lengths.ndim != 1 or self.lengths.dtype.is_floating_point:
            raise ValueError(f"caption lengths must be (B,) integers, got {tuple(self.lengths.shape)} {self.lengths.dtype}")

    @property
    def num_images(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def dim(self) -> int:
        return int(self.tokens.shape[1])

    @classmethod
    def null(cls, num_images: int, dim: int, *, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> "PackedText":
        """`num_images` null captions: no token at all."""
        return cls(torch.zeros(0, dim, device=device, dtype=dtype), torch.zeros(num_images, dtype=torch.long, device=device))

    @classmethod
    def from_list(cls, captions: list[torch.Tensor], dim: int | None = None) -> "PackedText":
        """Pack per-caption (L_i, E) token tensors (L_i may be 0); `dim` is needed only when `captions` is empty."""
        if not captions:
            if dim is None:
                raise ValueError("no captions to pack and no token width given")
            return cls.null(0, dim)
        lengths = torch.tensor([c.shape[0] for c in captions], dtype=torch.long, device=captions[0].device)
        return cls(torch.cat(captions, dim=0), lengths)

    def split(self) -> list[torch.Tensor]:
        """Per-caption (L_i, E) views (one host read of the lengths)."""
        return list(self.tokens.split(self.lengths.tolist(), dim=0))

    def cat(self, other: "PackedText") -> "PackedText":
        """Captions of self, then of other (e.g. [conditional; null] for one guided call)."""
        return PackedText(torch.cat([self.tokens, other.tokens.to(self.tokens)], dim=0),
                          torch.cat([self.lengths, other.lengths.to(self.lengths.device)], dim=0))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> "PackedText":
        """Tokens to device/dtype, lengths to the device (they stay long)."""
        return replace(self, tokens=self.tokens.to(device=device, dtype=dtype, non_blocking=non_blocking),
                       lengths=self.lengths.to(device=device, non_blocking=non_blocking))


@dataclass
class TextMeta:
    """Key-side offsets of packed cross-attention: caption i's tokens are rows cu_seqlens[i] : cu_seqlens[i+1]."""

    lengths: torch.Tensor  # (B,) long, on the model's device
    cu_seqlens: torch.Tensor  # (B+1,) int32
    max_seqlen: int  # longest caption (0 when every caption is null)
    seqlens_host: list[int]
    cache: dict[str, Any] = field(default_factory=dict)  # cross-attention masks (flex BlockMask, dense mask), loop runs

    @property
    def num_tokens(self) -> int:
        return sum(self.seqlens_host)

    @classmethod
    def build(cls, lengths: torch.Tensor, num_text_tokens: int, image_seqlens_host: list[int], *,
              device: torch.device | str | None = None, lengths_host: list[int] | None = None) -> "TextMeta":
        """Validate the caption lengths against the images and the token count; `lengths_host`: already read."""
        lengths_host = lengths.tolist() if lengths_host is None else lengths_host
        if len(lengths_host) != len(image_seqlens_host):
            raise ValueError(f"{len(lengths_host)} caption lengths for {len(image_seqlens_host)} images: "
                             "give one caption (length 0 for the null caption) per image")
        if any(n < 0 for n in lengths_host):
            raise ValueError(f"caption lengths must be >= 0, got {lengths_host[:16]}")
        if sum(lengths_host) != num_text_tokens:
            raise ValueError(f"caption lengths sum to {sum(lengths_host)} tokens but the packed caption tokens have "
                             f"{num_text_tokens} rows; pass the lengths that match the packed tokens")
        device = torch.device(device) if device is not None else lengths.device
        lengths_d = lengths.to(device=device, dtype=torch.long)
        # The per-image SDPA loop batches consecutive images whose (image length, caption length) pairs are equal.
        runs = equal_length_runs(list(zip(image_seqlens_host, lengths_host)))
        return cls(lengths=lengths_d, cu_seqlens=F.pad(torch.cumsum(lengths_d, 0), (1, 0)).to(torch.int32),
                   max_seqlen=max(lengths_host, default=0), seqlens_host=list(lengths_host),
                   cache={"cross_loop_runs": runs})
