"""A small CNN classifier used by the CPU demo as a stand-in for Inception (NOT Inception: its FID is not FID).

Every image, whatever its size, goes through the same preprocessing as Inception's: TF1 bilinear resize to
size x size, then (x - 128) / 128. Features: "pool" = global average of the last stage (penultimate layer),
"spatial" = first `spatial_channels` channels of the second-to-last stage's map flattened (H, W, C) — at size 64:
8·8·8 = 512 dims, so sFID's sqrtm stays cheap on CPU (2048 dims: 181 s here) — "logits" = classifier.
Every stage halves the map (64 -> 32 -> 16 -> 8 -> 4): ~13 MFLOPs a 64² image, so training takes about a minute on CPU
(evaluation/classifiers.py trains and scores them).

The same network with `input="gray-std"` is the demo's **shape classifier**: after the resize each image becomes one
grayscale channel standardised to zero mean and unit variance per image, so neither colour nor brightness can tell the
classes apart (a flat image of any colour becomes all zeros); only the layout of light and dark is left.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from nit_lightning.data.saved import file_sha256, load_payload, save_payload
from nit_lightning.evaluation.inception import tf1_resize

log = logging.getLogger(__name__)

KIND = "nit-featurenet"
ARCH_VERSION = 2  # 2: every stage halves, spatial from the second-to-last stage (1: full-res first stage)
INPUTS = ("rgb", "gray-std")  # what the first stage sees: the RGB image, or its per-image standardised luminance
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma


@dataclass
class FeatureNetConfig:
    """Architecture of the demo feature network."""

    num_classes: int
    size: int = 64
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    spatial_channels: int = 8
    input: str = "rgb"  # "rgb" | "gray-std" (shape classifier); files saved before this field are "rgb"

    def __post_init__(self) -> None:
        if self.input not in INPUTS:
            raise ValueError(f"featurenet input {self.input!r} is not one of {INPUTS}")
        if len(self.widths) < 2:
            raise ValueError(f"featurenet widths {self.widths} need at least 2 stages")
        stride = 2 ** len(self.widths)
        if self.size % stride or self.size < stride:
            raise ValueError(f"featurenet size {self.size} must be a positive multiple of {stride} "
                             f"(one halving per stage, widths {self.widths})")
        if self.num_classes < 2:
            raise ValueError(f"featurenet needs at least 2 classes, got {self.num_classes}")

    @property
    def in_channels(self) -> int:
        return 3 if self.input == "rgb" else 1

    @property
    def spatial_dim(self) -> int:
        side = self.size // 2 ** (len(self.widths) - 1)  # the second-to-last stage: one halving per stage before it
        return side * side * self.spatial_channels


def _stage(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
    )


class FeatureNet(nn.Module):
    """forward(uint8 (N, 3, H, W)) -> {"pool", "spatial", "logits"}, like the FID Inception."""

    def __init__(self, config: FeatureNetConfig) -> None:
        super().__init__()
        self.config = config
        widths = config.widths
        self.stages = nn.ModuleList([_stage(config.in_channels if i == 0 else widths[i - 1], widths[i], 2)
                                     for i in range(len(widths))])
        self.head = nn.Linear(widths[-1], config.num_classes)
        self.name = "featurenet (untrained) [demo stand-in, NOT Inception]"
        self.feature_dims = {"pool": widths[-1], "spatial": config.spatial_dim, "logits": config.num_classes}

    def preprocess(self, images_N3HW: torch.Tensor) -> torch.Tensor:
        """uint8 images of any size -> float (N, C, size, size), the same rule for every image: RGB in [-1, 1)
        (C = 3), or with input "gray-std" the luminance standardised per image (C = 1)."""
        if images_N3HW.dim() != 4 or images_N3HW.shape[1] != 3 or images_N3HW.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {images_N3HW.dtype} {tuple(images_N3HW.shape)}")
        x = images_N3HW.to(self.head.weight.device, torch.float32)
        x = tf1_resize(x, self.config.size, self.config.size)
        x = (x - 128.0) / 128.0
        return gray_standardise(x) if self.config.input == "gray-std" else x

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Features of preprocessed images."""
        spatial = None
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == len(self.stages) - 2:
                spatial = x[:, :self.config.spatial_channels].permute(0, 2, 3, 1).flatten(1)
        pool = x.mean(dim=(2, 3))
        return {"pool": pool, "spatial": spatial, "logits": self.head(pool)}

    def forward(self, images_N3HW: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.features(self.preprocess(images_N3HW))


def gray_standardise(x_N3HW: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W): BT.601 luminance, minus its per-image mean, over its per-image std.

    An image whose std is under `eps` (in units of the [-1, 1] range, ~1.3 grey levels) has no layout to show: it
    becomes exactly zero, so flat images of any colour are one and the same input (not amplified rounding noise).
    """
    weights = x_N3HW.new_tensor(GRAY_WEIGHTS).view(1, 3, 1, 1)
    gray = (x_N3HW * weights).sum(dim=1, keepdim=True)
    gray = gray - gray.mean(dim=(2, 3), keepdim=True)
    std = gray.std(dim=(2, 3), keepdim=True)
    return torch.where(std >= eps, gray / std.clamp_min(eps), torch.zeros_like(gray))


def save_featurenet(net: FeatureNet, out: str | Path, *, classes: list[str], report: dict) -> None:
    """Write the network with its config; the file says it is not Inception."""
    save_payload(out, {"kind": KIND, "arch_version": ARCH_VERSION, "config": asdict(net.config),
                       "note": "demo stand-in for Inception; its FID/IS are NOT comparable to published ones",
                       "state_dict": net.state_dict(), "classes": classes, "report": report})


def load_featurenet(path: str | Path, device: str | torch.device = "cpu") -> FeatureNet:
    """Load a saved feature net strictly; its `name` carries a hash of the file."""
    payload = load_payload(path, kind=KIND, version_key="arch_version", version=ARCH_VERSION, what="featurenet",
                           how_to_make="python -m nit_lightning featurenet --data DIR --out FILE.pt", unversioned=1)
    net = FeatureNet(FeatureNetConfig(**payload["config"]))
    net.load_state_dict(payload["state_dict"], strict=True)
    digest = file_sha256(path)[:12]
    if net.config.input == "rgb":
        net.name = f"featurenet-{digest} [demo stand-in, NOT Inception]"
    else:
        net.name = f"featurenet-{net.config.input}-{digest} [shape classifier: grayscale, standardised per image]"
    return net.to(device).eval()


