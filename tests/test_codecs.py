"""Codecs: pixel codec exact round trip, DC-AE through a tiny random AutoencoderDC saved to disk, clear errors."""
from __future__ import annotations

import pytest
import torch

from nit_lightning.data.codecs import (
    DEFAULT_DCAE_ID,
    DCAECodec,
    PixelCodec,
    codec_from_description,
    codec_from_spec,
)


def test_pixel_codec_exact_round_trip():
    codec = PixelCodec(8)
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 3 * 64, 4, 6) and codec.latent_channels == 192
    assert torch.equal(codec.decode(z), x)
    # Channel order (3, f, f): latent channel c·f² + i·f + j at (a, b) is pixel (c, a·f + i, b·f + j).
    assert z[1, 1 * 64 + 2 * 8 + 5, 3, 4] == x[1, 1, 3 * 8 + 2, 4 * 8 + 5]


def test_pixel_codec_rejects_sizes_not_multiple_of_factor():
    with pytest.raises(ValueError, match=r"36×48 is not a multiple of the codec factor 8"):
        PixelCodec(8).encode(torch.zeros(1, 3, 36, 48))


def test_encode_list_batches_equal_sizes_only():
    codec = PixelCodec(4)
    calls = []
    original = codec.encode
    codec.encode = lambda x: calls.append(tuple(x.shape)) or original(x)  # count codec calls
    images = [torch.rand(3, 8, 12), torch.rand(3, 16, 4), torch.rand(3, 8, 12), torch.rand(3, 8, 12)]
    latents = codec.encode_list(images, max_batch=2)
    assert calls == [(2, 3, 8, 12), (1, 3, 8, 12), (1, 3, 16, 4)]
    for image, latent in zip(images, latents):
        assert torch.equal(latent, original(image[None])[0])


def test_describe_round_trip_pixel():
    codec = codec_from_description(PixelCodec(16).describe())
    assert isinstance(codec, PixelCodec) and codec.factor == 16 and codec.latent_channels == 768
    assert codec_from_spec("pixel:4").factor == 4
    with pytest.raises(ValueError, match="is not pixel:F"):
        codec_from_spec("vae:foo")


@pytest.fixture(scope="module")
def tiny_dcae_dir(tmp_path_factory):
    """A random 3-stage AutoencoderDC (factor 2² = 4, 4 latent channels, scaling 0.41) saved in diffusers format."""
    from diffusers import AutoencoderDC

    torch.manual_seed(0)
    model = AutoencoderDC(
        latent_channels=4, attention_head_dim=4, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=(8, 8, 16), decoder_block_out_channels=(8, 8, 16),
        encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), ()), decoder_qkv_multiscales=((), (), ()), scaling_factor=0.41,
    )
    path = tmp_path_factory.mktemp("tiny_dcae")
    model.save_pretrained(path)
    return path


def test_dcae_codec_loads_local_dir_and_scales_by_config(tiny_dcae_dir):
    from diffusers import AutoencoderDC

    codec = DCAECodec(str(tiny_dcae_dir))
    assert (codec.factor, codec.latent_channels, codec.scaling_factor) == (4, 4, 0.41)
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 4, 4, 6)
    reference = AutoencoderDC.from_pretrained(tiny_dcae_dir).eval()
    with torch.no_grad():
        assert torch.allclose(z, reference.encode(x).latent * 0.41, atol=1e-6)
        decoded = codec.decode(z)
        assert decoded.shape == x.shape
        assert torch.allclose(decoded, reference.decode(z / 0.41).sample, atol=1e-6)
    latents = codec.encode_list([x[0], torch.rand(3, 8, 4) * 2 - 1, x[1]])
    assert [tuple(z.shape) for z in latents] == [(4, 4, 6), (4, 2, 1), (4, 4, 6)]
    with pytest.raises(ValueError, match="multiple of the codec factor 4"):
        codec.encode(torch.zeros(1, 3, 10, 8))


def test_dcae_describe_round_trip_and_bfloat16(tiny_dcae_dir):
    codec = DCAECodec(str(tiny_dcae_dir), dtype="bfloat16")
    description = codec.describe()
    assert description == {"type": "dcae", "path": str(tiny_dcae_dir), "dtype": "bfloat16", "factor": 4,
                           "latent_channels": 4, "scaling_factor": 0.41}
    again = codec_from_description(description)
    assert isinstance(again, DCAECodec) and again.dtype == torch.bfloat16 and again.scaling_factor == 0.41
    z = again.encode(torch.zeros(1, 3, 8, 8))
    assert z.dtype == torch.float32 and z.shape == (1, 4, 2, 2)
    with pytest.raises(ValueError, match="different model"):
        codec_from_description(dict(description, scaling_factor=1.0))


def test_dcae_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{DEFAULT_DCAE_ID}.*not found locally") as info:
        DCAECodec(DEFAULT_DCAE_ID)
    assert "huggingface-cli download" in str(info.value) and "--codec dcae:" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        codec_from_spec(f"dcae:{tmp_path}/absent")
    with pytest.raises(ValueError, match="codec dtype"):
        DCAECodec(str(tmp_path), dtype="int8")


def test_resolve_codec_takes_object_spec_description_then_fallback():
    from nit_lightning.data.codecs import PixelCodec, resolve_codec

    given = PixelCodec(2)
    assert resolve_codec(given, None, missing="x") == (given, "given")
    codec, source = resolve_codec("pixel:4", {"type": "pixel", "factor": 2}, missing="x")
    assert (codec.factor, source) == (4, "--codec pixel:4")  # an explicit codec wins over the fallback
    codec, source = resolve_codec(None, {"type": "pixel", "factor": 2}, missing="x", fallback_name="datamodule")
    assert (codec.factor, source) == (2, "datamodule")
    with pytest.raises(ValueError, match="pass one"):
        resolve_codec(None, None, missing="no codec recorded: pass one")
