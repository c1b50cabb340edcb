"""Feature extractors behind one protocol: the FID Inception and the demo feature net."""
from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

import torch

log = logging.getLogger(__name__)

SPEC_HELP = '"inception" (NIT_INCEPTION_WEIGHTS) | "inception:PATH.pth" | "featurenet:PATH.pt" (the demo\'s stand-in)'


@runtime_checkable
class FeatureExtractor(Protocol):
    """Maps uint8 images (N, 3, H, W) of any size to {"pool": (N, F), "spatial": (N, S), "logits": (N, K)}."""

    name: str  # recorded in reference npz files; samples and reference must share it

    def __call__(self, images_N3HW: torch.Tensor) -> dict[str, torch.Tensor]: ...


class BatchedExtractor:
    """Runs a feature network in fixed-size chunks under no_grad and returns float32 CPU features."""

    def __init__(self, net: torch.nn.Module, name: str, batch_size: int = 64) -> None:
        self.net = net.eval()
        self.name = name
        self.batch_size = batch_size
        self.dims: dict[str, int] = dict(net.feature_dims)  # {"pool": F, "spatial": S, "logits": K}

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @torch.no_grad()
    def __call__(self, images_N3HW: torch.Tensor) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, images_N3HW.shape[0], self.batch_size):
            out = self.net(images_N3HW[start:start + self.batch_size].to(self.device))
            for key, value in out.items():
                parts.setdefault(key, []).append(value.float().cpu())
        return {key: torch.cat(values) for key, values in parts.items()}


def load_feature_extractor(spec: str = "inception", *, device: str | torch.device = "cpu",
                           batch_size: int = 64, dtype: torch.dtype = torch.float32) -> BatchedExtractor:
    """Build an extractor from a spec string (see SPEC_HELP)."""
    from nit_lightning.evaluation import featurenet, inception

    kind, _, path = spec.partition(":")
    if kind == "inception":
        net = inception.load_inception(path or None, compute_dtype=dtype, device=device)
        return BatchedExtractor(net, inception.INCEPTION_NAME, batch_size)
    if kind == "featurenet":
        if not path:
            raise ValueError(f"feature spec {spec!r} needs a file: featurenet:PATH.pt")
        net = featurenet.load_featurenet(path, device=device)
        log.warning("features from %s: a demo stand-in, NOT the FID Inception; numbers are not comparable to "
                    "published FID/IS", net.name)
        return BatchedExtractor(net, net.name, batch_size)
    raise ValueError(f"unknown feature spec {spec!r}; use {SPEC_HELP}")


def is_reference_grade(name: str) -> bool:
    """True only for the real FID Inception (what published numbers use)."""
    from nit_lightning.evaluation.inception import INCEPTION_NAME

    return name == INCEPTION_NAME
