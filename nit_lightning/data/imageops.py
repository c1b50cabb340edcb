"""Image loading, RGB conversion and the resize rules of SPEC §4 (`native`, `fixed-S`), each reporting what it changed."""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

MODES_HELP = "native | fixed-256 | fixed-512 (any fixed-S with S a multiple of the codec factor)"


# Float pixels this far outside [0, 1] still round to 0 or 255 (half an 8-bit step): accepted and clipped.
FLOAT_SLACK = 0.5 / 255
# PIL reads 16-bit RGB(A) by keeping the high byte of each sample (v >> 8); decoding again with the other byte order
# gives the low byte, so that these images get ÷257 like 16-bit greyscale. rawmode suffix -> the other byte's suffix.
_OTHER_BYTE = {";16B": ";16L", ";16L": ";16B", ";16N": ";16B" if sys.byteorder == "little" else ";16L"}


class BadImage(ValueError):
    """An image that cannot be used; `reason` is a short code counted in index.json ("unreadable", "too-small")."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class SizeChange:
    """How an image's size was changed: original (H, W), final (H, W) and the operations, in order."""

    orig_hw: tuple[int, int]
    final_hw: tuple[int, int]
    ops: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return "; ".join(self.ops) if self.ops else "unchanged"


def default_max_area(multiple: int) -> int:
    """Area above which `native` first rescales: 2048² for DC-AE f32, i.e. (64 latent pixels · factor)²."""
    return (64 * multiple) ** 2


def parse_mode(mode: str, multiple: int) -> tuple[str, int | None]:
    """'native' -> ('native', None); 'fixed-256' -> ('fixed', 256); anything else is a clear error."""
    if mode == "native":
        return "native", None
    match = re.fullmatch(r"fixed-(\d+)", mode)
    if not match:
        raise ValueError(f"mode {mode!r} is not one of {MODES_HELP}")
    size = int(match.group(1))
    if size <= 0 or size % multiple:
        raise ValueError(f"mode {mode!r}: {size} is not a positive multiple of the codec factor {multiple}")
    return "fixed", size


def native_size(hw: tuple[int, int], multiple: int, max_area: int | None = None) -> tuple[tuple[int, int], list[str]]:
    """Target (H, W) of the `native` rule and the operations that lead to it; pure arithmetic, no pixels."""
    h, w = int(hw[0]), int(hw[1])
    if h < multiple or w < multiple:
        raise BadImage("too-small", f"{h}×{w} has a side under one multiple ({multiple}); it would need upscaling")
    max_area = default_max_area(multiple) if max_area is None else int(max_area)
    ops = []
    if h * w >= max_area:
        # Keep the aspect ratio: 3000×4000 at max 2048² -> scale √(2048²/12e6) = 0.5912 -> 1774×2365.
        scale = math.sqrt(max_area / (h * w))
        h2, w2 = max(1, round(h * scale)), max(1, round(w * scale))
        if (h2, w2) != (h, w):
            ops.append(f"area-rescale {h}x{w}->{h2}x{w2}")
        h, w = h2, w2
    # Down to a multiple, never up, except that a side squeezed under one multiple by the area rescale keeps one.
    h3, w3 = max(multiple, h // multiple * multiple), max(multiple, w // multiple * multiple)
    if (h3, w3) != (h, w):
        ops.append(f"resize-to-multiple-of-{multiple} {h}x{w}->{h3}x{w3}")
    return (h3, w3), ops


def resize_native(image: Image.Image, multiple: int, max_area: int | None = None) -> tuple[Image.Image, SizeChange]:
    """`native`: each side down to a multiple (never cropped), after an area cap; one bicubic resize to the final size."""
    orig_hw = (image.height, image.width)
    (h, w), ops = native_size(orig_hw, multiple, max_area)
    # The area rescale and the rounding to a multiple are composed into a single bicubic resample: same geometry,
    # one interpolation instead of two.
    if (h, w) != orig_hw:
        image = image.resize((w, h), Image.BICUBIC)
    return image, SizeChange(orig_hw, (h, w), ops)


def center_crop_adm(image: Image.Image, size: int, multiple: int = 1) -> tuple[Image.Image, SizeChange]:
    """`fixed-S` (ADM): box-halve while the short side ≥ 2S, bicubic-resize the short side to S, centre-crop S×S."""
    orig_hw = (image.height, image.width)
    if min(orig_hw) < multiple:
        raise BadImage("too-small", f"{orig_hw[0]}×{orig_hw[1]} has a side under one multiple ({multiple})")
    ops = []
    while min(image.size) >= 2 * size:
        before = (image.height, image.width)
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
        ops.append(f"box-halve {before[0]}x{before[1]}->{image.height}x{image.width}")
    scale = size / min(image.size)
    target = tuple(round(side * scale) for side in image.size)  # (W, H); the short side becomes exactly S
    if target != image.size:
        ops.append(f"bicubic-short-side-to-{size} {image.height}x{image.width}->{target[1]}x{target[0]}")
        image = image.resize(target, resample=Image.BICUBIC)
    top, left = (image.height - size) // 2, (image.width - size) // 2
    if (image.height, image.width) != (size, size):
        ops.append(f"centre-crop {image.height}x{image.width}->{size}x{size} at ({top}, {left})")
        image = image.crop((left, top, left + size, top + size))
    return image, SizeChange(orig_hw, (size, size), ops)


def apply_mode(image: Image.Image, mode: str, multiple: int, max_area: int | None = None) -> tuple[Image.Image, SizeChange]:
    """Dispatch on 'native' / 'fixed-S'."""
    kind, size = parse_mode(mode, multiple)
    if kind == "native":
        return resize_native(image, multiple, max_area)
    return center_crop_adm(image, size, multiple)


def to_rgb(image: Image.Image) -> tuple[Image.Image, str | None]:
    """Any PIL mode -> RGB; returns the conversion's reason code or None when already RGB. Alpha goes on white."""
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode == "P":
        has_alpha = "transparency" in image.info
        image = image.convert("RGBA" if has_alpha else "RGB")
        if not has_alpha:
            return image, "palette"
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), "alpha"
    if mode == "CMYK":
        return image.convert("RGB"), "cmyk"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit greyscale: 0..65535 -> 0..255 by ÷257, whatever the image's own maximum (a dark 16-bit image whose
        # maximum is 200 stays dark; it is not an 8-bit image). PIL's convert("RGB") would clip at 255 instead.
        array = np.asarray(image, dtype=np.int64)
        if mode == "I" and array.size and (array.min() < 0 or array.max() > 65535):  # 32-bit integer pixels
            raise BadImage("unsupported-pixels", f"32-bit integer pixels in [{array.min()}, {array.max()}]: only "
                                                 f"8- and 16-bit integers and floats in [0, 1] are read; convert it")
        return Image.fromarray(_div257(array), "L").convert("RGB"), "greyscale-16bit"
    if mode == "F":
        # Float images hold intensities in [0, 1] (the float TIFF convention): scaled by 255, never rounded as if
        # they were 0..255 (which made a [0, 1] image black). Anything else is refused rather than guessed.
        array = np.asarray(image, dtype=np.float64)
        if not np.isfinite(array).all():
            raise BadImage("unsupported-pixels", "float image with NaN or Inf pixels")
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if low < -FLOAT_SLACK or high > 1.0 + FLOAT_SLACK:
            raise BadImage("unsupported-pixels", f"float pixels in [{low:g}, {high:g}], not [0, 1]: rescale it to "
                                                 f"[0, 1] or save it as 8/16-bit")
        grey = np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB"), "greyscale-float"
    if mode in ("L", "1"):
        return image.convert("RGB"), "greyscale"
    return image.convert("RGB"), f"mode-{mode}"


def _div257(values: np.ndarray) -> np.ndarray:
    """16-bit values -> uint8 by round(v / 257), exact in integers: (v + 128) // 257 (v / 257 never ends in .5)."""
    return ((values.astype(np.int64) + 128) // 257).astype(np.uint8)


def _tile_rawmode(tile) -> str | None:
    """A decoder tile's rawmode: its args are the rawmode (PNG) or a tuple that starts with it (raw, TIFF)."""
    args = tile[3]
    return args if isinstance(args, str) else (args[0] if isinstance(args, tuple) and args else None)


def _with_rawmode(tile, rawmode: str):
    """The same tile (PIL's `_Tile` namedtuple, or a plain tuple before Pillow 11) decoding with another rawmode."""
    args = tile[3]
    parts = (*tile[:3], rawmode if isinstance(args, str) else (rawmode, *args[1:]), *tile[4:])
    return type(tile)(*parts) if hasattr(tile, "_fields") else parts


def _wide_rawmode(image: Image.Image) -> str | None:
    """The rawmode of a 16-bit-per-sample RGB(A) image (grey+alpha opens as RGBA) that PIL reads into 8 bits, else None."""
    rawmodes = {_tile_rawmode(tile) for tile in image.tile}
    if len(rawmodes) != 1:
        return None
    rawmode = rawmodes.pop()
    if image.mode in ("RGB", "RGBA") and isinstance(rawmode, str) and rawmode[-4:] in _OTHER_BYTE:
        return rawmode
    return None


def _restore_16bit(path: str | Path, image: Image.Image, rawmode: str) -> str:
    """Replace the high-byte pixels PIL loaded by round(v / 257) of the full 16-bit values; returns the reason code."""
    low_mode = rawmode[:-4] + _OTHER_BYTE[rawmode[-4:]]
    try:
        with Image.open(path) as again:
            again.tile = [_with_rawmode(tile, low_mode) for tile in again.tile]
            again.load()
            low = np.asarray(again, dtype=np.int64)
    except (OSError, ValueError):  # a rawmode PIL cannot decode (e.g. 16-bit grey+alpha): keep v >> 8, and say so
        return "16bit-high-byte"
    high = np.asarray(image, dtype=np.int64)
    if low.shape != high.shape:
        return "16bit-high-byte"
    image.paste(Image.fromarray(_div257(high * 256 + low), image.mode))
    return "rgb-16bit"


def load_rgb(path: str | Path) -> tuple[Image.Image, list[str]]:
    """Open and fully decode an image as RGB; returns the conversions applied. Any failure is a BadImage('unreadable')."""
    try:
        with Image.open(path) as opened:
            wide = _wide_rawmode(opened)
            opened.load()  # decode now: truncated or corrupt data fails here, not later
            depth = [_restore_16bit(path, opened, wide)] if wide else []
            transposed = ImageOps.exif_transpose(opened)
            image = transposed if transposed is not None else opened.copy()
            rotated = image is not opened and opened.getexif().get(0x0112, 1) not in (1, None)
            image, reason = to_rgb(image)
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError) as error:
        if isinstance(error, BadImage):
            raise
        raise BadImage("unreadable", f"{type(error).__name__}: {error}") from error
    conversions = depth + ([reason] if reason else []) + (["exif-orientation"] if rotated else [])
    return image, conversions


def open_rgb(path: str | Path) -> Image.Image:
    """A fully decoded RGB image, decoded exactly as `prepare` decodes it (`load_rgb`: EXIF orientation, 16-bit ÷257,
    alpha on white, palette, CMYK), so references, the tiny autoencoder and the demo classifiers see the pixels the
    training data was made from. A broken file is a BadImage naming it."""
    try:
        return load_rgb(path)[0]
    except BadImage as error:
        raise BadImage(error.reason, f"{path}: {error.detail}") from error


def read_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 of an image file (see open_rgb)."""
    return np.asarray(open_rgb(path), dtype=np.uint8)


# x = uint8 / 127.5 − 1 for the 256 values, computed by the CPU kernel. On the CPU the same arithmetic runs directly
# (the table is its definition; a test checks every value); elsewhere a gather from the table gives the same floats
# (CUDA divides by a scalar as a multiplication by its reciprocal, which can differ in the last bit), so latents encoded
# on a GPU from uint8 pixels match those of the CPU conversion.
_UNIT = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0


def pixels_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (any shape, any device) -> float32 in [-1, 1], x = uint8 / 127.5 − 1, bit-identical everywhere."""
    if pixels.dtype != torch.uint8:
        raise ValueError(f"expected uint8 pixels, got {pixels.dtype}")
    if pixels.device.type == "cpu":  # in place after the one allocation: fresh buffers cost more than the arithmetic
        return pixels.to(torch.float32).div_(127.5).sub_(1.0)
    return _UNIT.to(pixels.device)[pixels.long()]


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]: x = uint8 / 127.5 − 1."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image, got array of shape {array.shape}")
    return pixels_to_unit(torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))))
