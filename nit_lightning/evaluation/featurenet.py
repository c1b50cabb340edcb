"""A small CNN classifier used by the CPU demo as a stand-in for Inception (NOT Inception: its FID is not FID).

Every image, whatever its size, goes through the same preprocessing as Inception's: TF1 bilinear resize to
size x size, then (x - 128) / 128. Features: "pool" = global average of the last stage (penultimate layer),
"spatial" = first `spatial_channels` channels of the second-to-last stage's map flattened (H, W, C) — at size 64:
8·8·8 = 512 dims, so sFID's sqrtm stays cheap on CPU (2048 dims: 181 s here) — "logits" = classifier.
Every stage halves the map (64 -> 32 -> 16 -> 8 -> 4): ~13 MFLOPs a 64² image, so training takes about a minute on CPU.

The same network with `input="gray-std"` is the demo's **shape classifier**: after the resize each image becomes one
grayscale channel standardised to zero mean and unit variance per image, so neither colour nor brightness can tell the
classes apart (a flat image of any colour becomes all zeros); only the layout of light and dark is left.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nit_lightning.data.imageops import read_rgb
from nit_lightning.data.listing import list_labelled_images
from nit_lightning.evaluation.arrays import open_npz
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


def list_image_folder(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """ImageNet-style folder (ROOT/<class>/<image>) -> sorted files, labels, class names."""
    listing = list_labelled_images(root)
    if not listing.items:
        raise FileNotFoundError(f"no images under {str(root)!r}/<class>/ (make some with `python -m nit_lightning synth`)")
    return [Path(root) / rel for rel, _ in listing.items], [label for _, label in listing.items], listing.classes


def _load_uint8(path: Path) -> torch.Tensor:
    return torch.from_numpy(read_rgb(path).copy()).permute(2, 0, 1)


def train_featurenet(data_dir: str | Path, out: str | Path, *, epochs: int = 10, size: int = 64,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0, val_fraction: float = 0.1,
                     input: str = "rgb") -> dict:
    """Train the classifier on an image folder, save {config, state_dict, classes, report} to `out`; the report.

    input="gray-std" trains the shape classifier (see the module docstring)."""
    files, labels, classes = list_image_folder(data_dir)
    torch.manual_seed(seed)
    net = FeatureNet(FeatureNetConfig(num_classes=len(classes), size=size, input=input))
    start = time.time()
    with torch.no_grad():  # every image preprocessed once, by the rule used at evaluation time
        x = torch.cat([net.preprocess(_load_uint8(f)[None]) for f in files])
    y = torch.tensor(labels)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(files), generator=gen)
    n_val = int(round(len(files) * val_fraction)) if len(files) >= 20 else 0
    val_idx, train_idx = order[:n_val], order[n_val:]
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * max(1, -(-len(train_idx) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net.train()
    for epoch in range(epochs):
        perm = train_idx[torch.randperm(len(train_idx), generator=gen)]
        total, correct, loss_sum = 0, 0, 0.0
        for b0 in range(0, len(perm), batch_size):
            idx = perm[b0:b0 + batch_size]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            logits = net.features(xb)["logits"]
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
            total += len(idx)
        log.info("featurenet epoch %d/%d: loss %.4f, train acc %.3f", epoch + 1, epochs, loss_sum / total,
                 correct / total)
    _recalibrate_batchnorm(net, x[train_idx], batch_size)
    net.eval()
    report = {"input": input, "images": len(files), "classes": len(classes), "train_images": int(len(train_idx)),
              "val_images": int(n_val), "epochs": epochs, "train_loss": loss_sum / max(total, 1),
              "train_acc": correct / max(total, 1), "seconds": round(time.time() - start, 1)}
    if n_val:
        with torch.no_grad():
            pred = net.features(x[val_idx])["logits"].argmax(1)
        report["val_acc"] = float((pred == y[val_idx]).double().mean())
    save_featurenet(net, out, classes=classes, report=report)
    return report


@torch.no_grad()
def _recalibrate_batchnorm(net: FeatureNet, x: torch.Tensor, batch_size: int) -> None:
    """Exact BN statistics of the final weights (a short run leaves the momentum-0.1 running averages stale)."""
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    net.train()
    for b0 in range(0, len(x), batch_size):
        net.features(x[b0:b0 + batch_size])
    for m in norms:
        m.momentum = 0.1


def save_featurenet(net: FeatureNet, out: str | Path, *, classes: list[str], report: dict) -> None:
    """Write the network with its config; the file says it is not Inception."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"kind": KIND, "arch_version": ARCH_VERSION, "note": "demo stand-in for Inception; its FID/IS are NOT comparable to published ones",
               "config": asdict(net.config), "state_dict": net.state_dict(), "classes": classes, "report": report}
    tmp = out.with_name(out.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out)


def load_featurenet(path: str | Path, device: str | torch.device = "cpu") -> FeatureNet:
    """Load a saved feature net strictly; its `name` carries a hash of the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"featurenet file {str(path)!r} not found; train one with "
                                "`python -m nit_lightning featurenet --data DIR --out FILE.pt`")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("kind") != KIND:
        raise ValueError(f"{str(path)!r} is not a featurenet file (kind {payload.get('kind') if isinstance(payload, dict) else None!r})")
    if payload.get("arch_version") != ARCH_VERSION:
        raise ValueError(f"{str(path)!r} is a featurenet of architecture version {payload.get('arch_version', 1)}, "
                         f"this code builds version {ARCH_VERSION}: retrain it with `python -m nit_lightning featurenet`")
    net = FeatureNet(FeatureNetConfig(**payload["config"]))
    net.load_state_dict(payload["state_dict"], strict=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    if net.config.input == "rgb":
        net.name = f"featurenet-{digest} [demo stand-in, NOT Inception]"
    else:
        net.name = f"featurenet-{net.config.input}-{digest} [shape classifier: grayscale, standardised per image]"
    return net.to(device).eval()


ImageSet = Union[str, Path, np.ndarray, torch.Tensor, Sequence[torch.Tensor]]


def _as_classifier(classifier: FeatureNet | str | Path | nn.Module) -> FeatureNet:
    """A FeatureNet, a saved one (path), or a wrapper holding one as `.net` (features.BatchedExtractor)."""
    if isinstance(classifier, (str, Path)):
        return load_featurenet(classifier)
    net = getattr(classifier, "net", classifier)
    if not isinstance(net, FeatureNet):
        raise TypeError(f"need a FeatureNet, a featurenet file or an extractor holding one, got {type(classifier).__name__}")
    return net


def labelled_images(images: ImageSet, labels: np.ndarray | Sequence[int] | None) -> tuple[list[torch.Tensor], np.ndarray]:
    """Batches of uint8 (n, 3, H, W) in order, and the labels, from an ADM npz (arr_0 NHWC; labels default to
    arr_1), an NHWC uint8 array, an (N, 3, H, W) uint8 tensor or a list of (3, H, W) uint8 tensors of any sizes."""
    if isinstance(images, (str, Path)):
        with open_npz(images, "ADM samples with arr_0 and arr_1") as data:
            if labels is None and "arr_1" not in data:
                raise ValueError(f"{str(images)!r} has no arr_1 (labels); pass labels")
            labels = data["arr_1"] if labels is None else labels
            images = data["arr_0"]
    if labels is None:
        raise ValueError("labels are needed unless the images come from an npz with arr_1")
    if isinstance(images, np.ndarray):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"an image array must be uint8 NHWC with 3 channels, got {images.dtype} {images.shape}")
        batches = [torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)]
    elif isinstance(images, torch.Tensor):
        batches = [images]
    else:
        batches = []  # runs of equal sizes, in order, so that the labels keep their positions
        for image in images:
            if batches and batches[-1][-1].shape == image.shape:
                batches[-1].append(image)
            else:
                batches.append([image])
        batches = [torch.stack(run) for run in batches]
    labels = np.asarray(labels).astype(np.int64)
    count = sum(len(b) for b in batches)
    if count != len(labels):
        raise ValueError(f"{count} images but {len(labels)} labels")
    return batches, labels


@torch.no_grad()
def accuracy(images: ImageSet, labels: np.ndarray | Sequence[int] | None,
             classifier: FeatureNet | str | Path | nn.Module, batch_size: int = 256) -> float:
    """Share of images the classifier assigns to their label (see `labelled_images` for the accepted inputs)."""
    net = _as_classifier(classifier).eval()
    batches, labels = labelled_images(images, labels)
    predicted = []
    for batch in batches:
        for start in range(0, len(batch), batch_size):
            predicted.append(net(batch[start:start + batch_size])["logits"].argmax(1).cpu().numpy())
    return float((np.concatenate(predicted) == labels).mean())


def shape_accuracy(images: ImageSet, labels: np.ndarray | Sequence[int] | None,
                   classifier: FeatureNet | str | Path | nn.Module, batch_size: int = 256) -> float:
    """`accuracy` with a shape classifier (input "gray-std"): colour and brightness cannot help it."""
    net = _as_classifier(classifier)
    if net.config.input != "gray-std":
        raise ValueError(f"shape accuracy needs a classifier trained with input 'gray-std', {net.name} sees "
                         f"{net.config.input!r}; train one with `featurenet --input gray-std`")
    return accuracy(images, labels, net, batch_size)
