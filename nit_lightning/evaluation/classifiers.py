"""Training and scoring the demo's classifiers (evaluation/featurenet.py): the feature net (RGB) that stands in for
Inception, and the shape classifier (grayscale, standardised per image) whose accuracy on samples says whether the
shapes of the classes were generated, not only their colours."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nit_lightning.data.imageops import read_rgb
from nit_lightning.data.listing import list_labelled_images
from nit_lightning.evaluation.arrays import open_npz
from nit_lightning.evaluation.featurenet import FeatureNet, FeatureNetConfig, load_featurenet, save_featurenet

log = logging.getLogger(__name__)


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
    return train_classifier(files, labels, classes, out, epochs=epochs, size=size, batch_size=batch_size, lr=lr,
                            seed=seed, val_fraction=val_fraction, input=input)


def train_classifier(files: Sequence[Path], labels: Sequence[int], classes: Sequence[str], out: str | Path, *,
                     epochs: int = 10, size: int = 64, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                     val_fraction: float = 0.1, input: str = "rgb") -> dict:
    """`train_featurenet` on given files and labels (indices into `classes`), e.g. a captioned set's shapes."""
    files, classes = [Path(f) for f in files], list(classes)
    if len(files) != len(labels) or not files:
        raise ValueError(f"need one label per image and at least one image, got {len(files)} files, {len(labels)} labels")
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
