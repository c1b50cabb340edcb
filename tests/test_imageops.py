"""Pixel values of the image files prepare reads: 16-bit is ÷257 always, float is [0, 1] scaled, on real files."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nit_lightning.data.imageops import BadImage, load_rgb


def write_png16(path: Path, values: np.ndarray, filters: tuple[int, ...] = (0, 1, 2)) -> Path:
    """A real 16-bit PNG (grey (H, W), RGB (H, W, 3) or RGBA (H, W, 4)) written byte by byte: PIL cannot write 16-bit
    colour. Rows cycle through the given PNG filters (0 none, 1 sub, 2 up) so that the reader's unfiltering is exercised."""
    values = np.asarray(values, dtype=np.uint16)
    channels = 1 if values.ndim == 2 else values.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = values.reshape(values.shape[0], -1).astype(">u2").view(np.uint8).reshape(values.shape[0], -1)
    bpp = 2 * channels
    raw, previous = b"", np.zeros_like(rows[0])
    for y, row in enumerate(rows):
        kind = filters[y % len(filters)]
        if kind == 1:  # sub: minus the byte one pixel to the left
            encoded = row - np.concatenate([np.zeros(bpp, np.uint8), row[:-bpp]])
        elif kind == 2:  # up: minus the byte above
            encoded = row - previous
        else:
            encoded = row
        raw += bytes([kind]) + encoded.astype(np.uint8).tobytes()
        previous = row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", values.shape[1], values.shape[0], 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def div257(values) -> np.ndarray:
    return np.rint(np.asarray(values, dtype=np.float64) / 257).astype(np.uint8)


def test_dark_16bit_grey_png_is_divided_by_257_not_read_as_8bit(tmp_path):
    # Max 255: the old rule took this for an 8-bit image and kept 200 as 200; a 16-bit 200 is 200/257 -> 1.
    values = np.array([[0, 128, 129, 200], [255, 256, 3000, 65535]], dtype=np.uint16)
    for name, grid in {"dark": values[:1], "full": values}.items():
        Image.fromarray(grid).save(tmp_path / f"{name}.png")
        assert Image.open(tmp_path / f"{name}.png").mode == "I;16"  # a real 16-bit file
        image, conversions = load_rgb(tmp_path / f"{name}.png")
        assert conversions == ["greyscale-16bit"]
        assert np.array_equal(np.asarray(image)[..., 0], div257(grid)), name
    assert np.asarray(load_rgb(tmp_path / "dark.png")[0])[0, :, 0].tolist() == [0, 0, 1, 1]


def test_16bit_rgb_and_rgba_png_are_divided_by_257(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 65536, size=(7, 9, 3))
    rgb[0, :3] = [[200, 511, 65279], [128, 129, 65535], [0, 257, 383]]  # v >> 8 and round(v / 257) differ on most
    image, conversions = load_rgb(write_png16(tmp_path / "rgb.png", rgb))
    assert Image.open(tmp_path / "rgb.png").mode == "RGB"  # PIL itself keeps only the high byte (v >> 8)
    assert conversions == ["rgb-16bit"] and np.array_equal(np.asarray(image), div257(rgb))
    rgba = np.concatenate([rgb, np.full((7, 9, 1), 65535)], axis=2)  # opaque: compositing on white changes nothing
    image, conversions = load_rgb(write_png16(tmp_path / "rgba.png", rgba))
    assert conversions == ["rgb-16bit", "alpha"] and np.array_equal(np.asarray(image), div257(rgb))


def test_float_tiff_in_0_1_is_scaled_not_rounded(tmp_path):
    values = np.array([[0.0, 0.25, 0.5], [0.75, 1.0, 0.002]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    image, conversions = load_rgb(tmp_path / "float.tif")
    assert conversions == ["greyscale-float"]
    assert np.asarray(image)[..., 0].tolist() == [[0, 64, 128], [191, 255, 1]]  # x·255, rounded half to even


@pytest.mark.parametrize("values, detail", [([[0.0, 2.0]], r"float pixels in \[0, 2\]"),
                                            ([[0.0, np.nan]], "NaN or Inf")])
def test_float_tiff_outside_0_1_is_refused_not_guessed(tmp_path, values, detail):
    Image.fromarray(np.array(values, dtype=np.float32)).save(tmp_path / "odd.tif")
    with pytest.raises(BadImage, match=detail) as error:
        load_rgb(tmp_path / "odd.tif")
    assert error.value.reason == "unsupported-pixels"


def unusual_files(folder: Path) -> list[Path]:
    """One file of each kind that decoders disagree on: EXIF-rotated JPEG, 16-bit grey PNG, transparent RGBA PNG,
    palette PNG with a transparent index, CMYK JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    gradient = np.linspace(0, 255, 48 * 32 * 3).reshape(32, 48, 3).astype(np.uint8)
    rotated = Image.fromarray(gradient)
    exif = rotated.getexif()
    exif[0x0112] = 6  # shown rotated 90° clockwise
    rotated.save(folder / "rotated.jpg", exif=exif, quality=95)
    Image.fromarray((np.arange(32 * 48).reshape(32, 48) * 40).astype(np.uint16)).save(folder / "grey16.png")
    rgba = np.zeros((32, 48, 4), np.uint8)
    rgba[..., 0], rgba[:, :24, 3] = 200, 255  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    palette = Image.fromarray((np.arange(32 * 48).reshape(32, 48) % 4).astype(np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)
    palette.save(folder / "palette.png", transparency=3)
    Image.new("CMYK", (48, 32), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    return sorted(folder.iterdir())


def test_every_reader_decodes_images_as_prepare_does(tmp_path):
    """reference build, the tiny autoencoder and the demo classifiers read images like prepare: EXIF orientation, 16-bit
    ÷257, alpha and palette transparency on white, CMYK. Before, they ignored EXIF, clipped 16-bit grey to 255 and turned
    transparency black."""
    from nit_lightning.data.imageops import image_to_tensor, open_rgb, read_rgb
    from nit_lightning.data.tinyae import _load_images
    from nit_lightning.evaluation.classifiers import _load_uint8
    from nit_lightning.evaluation.reference import fit_to_size

    for path in unusual_files(tmp_path / "odd"):
        expected = np.asarray(load_rgb(path)[0])
        assert np.array_equal(np.asarray(open_rgb(path)), expected), path.name
        assert np.array_equal(read_rgb(path), expected), path.name
        assert np.array_equal(_load_uint8(path).permute(1, 2, 0).numpy(), expected), path.name
        assert torch_equal(_load_images([path])[0], image_to_tensor(Image.fromarray(expected))), path.name
        height, width = expected.shape[:2]
        assert np.array_equal(fit_to_size(open_rgb(path), height, width), expected), path.name
    assert np.asarray(open_rgb(tmp_path / "odd" / "rotated.jpg")).shape == (48, 32, 3)  # rotated by its EXIF tag
    assert np.asarray(open_rgb(tmp_path / "odd" / "grey16.png")).max() < 255  # ÷257, not clipped at 255
    assert np.asarray(open_rgb(tmp_path / "odd" / "alpha.png"))[0, -1].tolist() == [255, 255, 255]  # on white


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
