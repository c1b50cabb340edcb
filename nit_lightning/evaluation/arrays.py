"""Image arrays in and out of files: ADM .npz opened without pickle (one clear error for anything else), NHWC -> NCHW."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch


def open_npz(path: str | Path, what: str) -> np.lib.npyio.NpzFile:
    """np.load of an .npz without pickle; anything else (text, a truncated zip, a bare .npy) is one clear error."""
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{str(path)!r} is not a readable .npz ({what}): {type(error).__name__}: {error}") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{str(path)!r} is a bare .npy array, not an .npz ({what})")
    return data


def nhwc_to_tensor(images_NHW3: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 array -> (N, 3, H, W) uint8 tensor."""
    if images_NHW3.dtype != np.uint8 or images_NHW3.ndim != 4 or images_NHW3.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images_NHW3.dtype} {images_NHW3.shape}")
    return torch.from_numpy(np.ascontiguousarray(images_NHW3)).permute(0, 3, 1, 2)
