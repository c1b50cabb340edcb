"""FID Inception-v3 (TF graph 2015-12-05) in plain PyTorch: pool3, spatial (sFID) and logits (IS) features.

The state dict matches `pt_inception-2015-12-05-6726825d.pth` key for key (566 tensors, no AuxLogits); it is loaded
strictly. The FID variant differs from torchvision's Inception-v3 in its pooling: the A, C and first E blocks average
with `count_include_pad=False` (TF's SAME average pooling divides by the real window size), the last E block
(Mixed_7c) max-pools its pool branch, and the classifier has 1008 classes.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nit_lightning.records.names import WEIGHTS_DOCS

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "NIT_INCEPTION_WEIGHTS"
INCEPTION_NAME = "inception-2015-12-05"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7  # sFID: first 7 channels of Mixed_6d.branch1x1 at 17x17 -> 17*17*7 = 2023 dims


def tf1_resize_matrix(n_in: int, n_out: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n_out, n_in) weights of TF1 bilinear resize: source = dest * in/out (no half-pixel offset), clamped."""
    scale = n_in / n_out
    src = torch.arange(n_out, dtype=torch.float64) * scale
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo.double()
    weights = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    weights[rows, lo] += 1.0 - frac
    weights[rows, hi] += frac  # at the edge lo == hi and the two weights add up to 1
    return weights.to(dtype)


def tf1_resize(x_NCHW: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Separable TF1 bilinear resize (align_corners=False, no half-pixel offset) of a float tensor."""
    _, _, h_in, w_in = x_NCHW.shape
    if (h_in, w_in) == (height, width):
        return x_NCHW
    r_h = tf1_resize_matrix(h_in, height, x_NCHW.dtype).to(x_NCHW.device)  # (H_out, H_in)
    r_w = tf1_resize_matrix(w_in, width, x_NCHW.dtype).to(x_NCHW.device)  # (W_out, W_in)
    # out[n, c] = R_h @ x[n, c] @ R_w^T: two small matmuls instead of a gather, exact to rounding.
    return torch.matmul(torch.matmul(r_h, x_NCHW), r_w.transpose(0, 1))


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 0.001) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    # TF SAME average pooling divides by the number of real pixels in the window.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3, avg-pool branches."""

    def __init__(self, c_in: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b5, b3, bp], 1)


class BlockB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class BlockC(nn.Module):
    """Mixed_6b..6e: factorised 7x7 branches at 17x17."""

    def __init__(self, c_in: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg3(x))
        return torch.cat([b1, b7, bd, bp], 1)


class BlockD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, 3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class BlockE(nn.Module):
    """Mixed_7b (avg pool, count_include_pad=False) and Mixed_7c (max pool): the FID graph's two E blocks differ."""

    def __init__(self, c_in: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool {pool!r} must be 'avg' or 'max'")
        self.pool = pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, bd, bp], 1)  # 320 + 768 + 768 + 192 = 2048


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the TF FID graph; forward(uint8 (N, 3, H, W)) -> {"pool", "spatial", "logits"}."""

    def __init__(self, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.compute_dtype = compute_dtype
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, "avg")
        self.Mixed_7c = BlockE(2048, "max")
        self.fc = nn.Linear(2048, 1008)
        self.name = INCEPTION_NAME
        self.feature_dims = {"pool": 2048, "spatial": 17 * 17 * SPATIAL_CHANNELS, "logits": 1008}
        self.to(compute_dtype)
        self.eval()

    def preprocess(self, images_N3HW: torch.Tensor) -> torch.Tensor:
        """uint8 images of any size -> TF1-resized 299x299, scaled to (x - 128) / 128, in the compute dtype."""
        if images_N3HW.dim() != 4 or images_N3HW.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images_N3HW.shape)}")
        if images_N3HW.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 in [0, 255], got dtype {images_N3HW.dtype}; convert them first")
        x = images_N3HW.to(self.fc.weight.device, self.compute_dtype)
        x = tf1_resize(x, INPUT_SIZE, INPUT_SIZE)
        return (x - 128.0) / 128.0

    @torch.no_grad()
    def forward(self, images_N3HW: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.preprocess(images_N3HW)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 299 -> 149 -> 147 -> 147
        x = F.max_pool2d(x, 3, stride=2)  # 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # 71
        x = F.max_pool2d(x, 3, stride=2)  # 35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # 17
        # sFID taps Mixed_6d's 1x1 branch (after ReLU): (N, 192, 17, 17) -> first 7 channels, (H, W, C) order.
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)
        x = self.Mixed_6e(self.Mixed_6d(x))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))
        logits = pool @ self.fc.weight.transpose(0, 1)  # the TF graph's softmax input has no bias
        return {"pool": pool, "spatial": spatial, "logits": logits}


def resolve_weights_path(weights_path: str | os.PathLike | None) -> Path:
    """The Inception weights path from the argument or $NIT_INCEPTION_WEIGHTS; a clear error when missing."""
    raw = weights_path if weights_path is not None else os.environ.get(WEIGHTS_ENV)
    if raw is None:
        raise FileNotFoundError(
            f"FID Inception weights not given: download {WEIGHTS_FILE} (the pytorch-fid release of the TF "
            f"2015-12-05 graph) and pass its path (--features inception:/path/{WEIGHTS_FILE}) or set {WEIGHTS_ENV}; "
            f"where to get it: {WEIGHTS_DOCS}"
        )
    path = Path(raw).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"FID Inception weights {str(path)!r} not found: put {WEIGHTS_FILE} there, or point "
            f"--features inception:PATH / {WEIGHTS_ENV} to where it is; where to get it: {WEIGHTS_DOCS}"
        )
    return path


def load_state_dict_strict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load with strict key and shape checks; the error lists every missing, unexpected or misshapen key."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    misshapen = [f"{k}: {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}"
                 for k in sorted(set(own) & set(state_dict)) if tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or misshapen:
        raise KeyError(
            f"Inception state dict does not match the FID layout: missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {misshapen}; is this {WEIGHTS_FILE}?"
        )
    model.load_state_dict(state_dict, strict=True)


def load_inception(weights_path: str | os.PathLike | None = None, *, compute_dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception with the public weights, loaded strictly, in eval mode."""
    path = resolve_weights_path(weights_path)
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    model = FIDInceptionV3(compute_dtype=torch.float32)
    load_state_dict_strict(model, state_dict)
    model.compute_dtype = compute_dtype
    return model.to(device=device, dtype=compute_dtype).eval()
