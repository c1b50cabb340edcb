"""The tinyae codec: round trip quality on synthetic images, unit-variance latents, describe / rebuild, bad inputs,
deterministic training, and shards made with it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nit_lightning.data.codecs import TinyAECodec, codec_from_description, codec_from_spec, resolve_codec
from nit_lightning.data.saved import file_sha256
from nit_lightning.data.synthetic import SynthSettings, render, write_synthetic
from nit_lightning.data.tinyae import (
    TinyAE,
    TinyAEConfig,
    TinyAETrainSettings,
    load_tinyae,
    psnr,
    save_tinyae,
    train_tinyae,
)

# Small enough for a test (measured on one loaded core: ~7 s for 300 steps), big enough to learn the set.
CONFIG = TinyAEConfig(latent_channels=8, factor=8, width=64, blocks=1)
TRAIN = TinyAETrainSettings(steps=300, batch_size=16, crop=32, seed=0)


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(SynthSettings(out=str(root), num_images=100, num_classes=10, min_side=32, max_side=64, seed=0))
    return root


@pytest.fixture(scope="module")
def ae_file(images_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tinyae") / "ae.pt"
    report = train_tinyae(images_dir, path, CONFIG, TRAIN)
    assert report["images"] == 100 and report["steps"] == 300
    return path


def held_out(n: int = 20, hw: tuple[int, int] = (48, 64)) -> torch.Tensor:
    """Images of the same families the set was not made from (other seeds), in [-1, 1]: (n, 3, H, W)."""
    arrays = [render(i % 10, hw, np.random.default_rng([12345, i])) for i in range(n)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_round_trip_quality_and_unit_variance(ae_file):
    codec = codec_from_spec(f"tinyae:{ae_file}")
    assert isinstance(codec, TinyAECodec) and (codec.factor, codec.latent_channels) == (8, 8)
    x = held_out()
    z = codec.encode(x)
    assert z.shape == (20, 8, 6, 8)
    # Measured after 300 steps: mean 20.8 dB (min 14.7) on these images; the mean-colour image scores ~12 dB.
    ours = np.mean([psnr(codec.decode(z[i:i + 1]), x[i:i + 1]) for i in range(len(x))])
    flat = np.mean([psnr(x[i:i + 1].mean(dim=(2, 3), keepdim=True).expand_as(x[i:i + 1]), x[i:i + 1])
                    for i in range(len(x))])
    assert ours >= 18.0 and ours >= flat + 4.0, (ours, flat)
    # latent = encoder · scaling_factor with the factor fitted to 1 / std over training crops: ~unit variance.
    assert 0.6 < float(z.std()) < 1.6
    # Encoding is per latent pixel with 3×3 context: a bigger canvas works too (128 px -> 16 latent pixels).
    assert codec.encode(held_out(2, (128, 64))).shape == (2, 8, 16, 8)


def test_describe_and_rebuild(ae_file):
    codec = codec_from_spec(f"tinyae:{ae_file}")
    description = codec.describe()
    assert description == {"type": "tinyae", "path": str(ae_file), "sha256": file_sha256(ae_file), "factor": 8,
                           "latent_channels": 8, "scaling_factor": codec.scaling_factor}
    json.dumps(description)  # it goes into shard indexes and checkpoints
    again = codec_from_description(json.loads(json.dumps(description)))
    x = held_out(4)
    torch.testing.assert_close(again.encode(x), codec.encode(x), rtol=0, atol=0)
    z = torch.randn(2, 8, 3, 5)
    torch.testing.assert_close(again.decode(z), codec.decode(z), rtol=0, atol=0)
    rebuilt, source = resolve_codec(None, description, missing="none")
    assert isinstance(rebuilt, TinyAECodec) and source == "fallback description"


def test_bad_inputs(ae_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="tinyae file .* not found; make one with"):
        codec_from_spec(f"tinyae:{tmp_path / 'nope.pt'}")
    with pytest.raises(ValueError, match="needs a file: tinyae:PATH"):
        codec_from_spec("tinyae")
    torch.save({"kind": "nit-featurenet", "state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a tinyae file \\(kind 'nit-featurenet'"):
        codec_from_spec(f"tinyae:{tmp_path / 'other.pt'}")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a tinyae file"):
        codec_from_spec(f"tinyae:{tmp_path / 'text.pt'}")
    codec = codec_from_spec(f"tinyae:{ae_file}")
    with pytest.raises(ValueError, match="36×48 is not a multiple of the codec factor 8"):
        codec.encode(torch.zeros(1, 3, 36, 48))
    with pytest.raises(ValueError, match=r"must be \(B, 3, H, W\)"):
        codec.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="needs C=8, got 4"):
        codec.decode(torch.zeros(1, 4, 2, 2))
    # The weights changed after the shards were made: same path, other bytes -> the description no longer matches.
    description = codec.describe()
    changed = tmp_path / "ae.pt"
    net, scale, payload = load_tinyae(ae_file)
    save_tinyae(net, changed, scaling_factor=scale * 1.5, report=payload["report"])
    with pytest.raises(ValueError, match="the weights changed since `prepare`"):
        codec_from_description({**description, "path": str(changed)})


def test_training_is_deterministic_per_seed(images_dir, tmp_path):
    quick = TinyAETrainSettings(steps=5, batch_size=4, crop=32, seed=3)
    config = TinyAEConfig(latent_channels=4, width=16, blocks=1)
    train_tinyae(images_dir, tmp_path / "a.pt", config, quick)
    train_tinyae(images_dir, tmp_path / "b.pt", config, quick)
    train_tinyae(images_dir, tmp_path / "c.pt", config, TinyAETrainSettings(steps=5, batch_size=4, crop=32, seed=4))
    (a, sa, _), (b, sb, _), (c, sc, _) = (load_tinyae(tmp_path / f"{n}.pt") for n in "abc")
    assert sa == sb and sa != sc
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())


def test_config_and_training_errors(images_dir, tmp_path):
    with pytest.raises(ValueError, match="latent_channels"):
        TinyAEConfig(latent_channels=0)
    with pytest.raises(ValueError, match="crop 36 must be a multiple of the factor 8"):
        train_tinyae(images_dir, tmp_path / "x.pt", CONFIG, TinyAETrainSettings(crop=36))
    with pytest.raises(ValueError, match="smaller than the 40-px crop"):
        train_tinyae(images_dir, tmp_path / "x.pt", TinyAEConfig(factor=4), TinyAETrainSettings(crop=40))
    with pytest.raises(FileNotFoundError, match="no images .* under"):
        train_tinyae(tmp_path, tmp_path / "x.pt", CONFIG, TRAIN)
    untrained = TinyAE(CONFIG)
    assert untrained.encode(torch.zeros(1, 3, 16, 24)).shape == (1, 8, 2, 3)


def test_prepare_records_and_rebuilds_the_codec(ae_file, images_dir, tmp_path):
    from nit_lightning.data.prepare import PrepareSettings, run_prepare

    result = run_prepare(PrepareSettings(input=str(images_dir), output=str(tmp_path / "shards"), mode="native",
                                         codec=f"tinyae:{ae_file}", samples_per_shard=50))
    index = result["index"]
    assert index["codec"]["type"] == "tinyae" and index["latent_channels"] == 8 and index["factor"] == 8
    assert index["num_samples"] == 100
    assert codec_from_description(index["codec"]).sha256 == file_sha256(ae_file)
