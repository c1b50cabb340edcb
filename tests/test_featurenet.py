"""The demo feature network: shapes, one preprocessing rule for every size, training, saving, loading by spec."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nit_lightning.cli import featurenet as featurenet_cmd
from nit_lightning.evaluation.featurenet import FeatureNet, FeatureNetConfig, load_featurenet, save_featurenet
from nit_lightning.evaluation.features import load_feature_extractor


def write_two_colour_folder(root, per_class: int = 16, seed: int = 0) -> None:
    """Class 'red' and class 'blue', noisy images of assorted sizes: trivially separable."""
    rng = np.random.default_rng(seed)
    for name, channel in (("blue", 2), ("red", 0)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(20, 48, size=2)
            img = rng.integers(0, 90, size=(h, w, 3)).astype(np.uint8)
            img[..., channel] = rng.integers(160, 256, size=(h, w))
            Image.fromarray(img).save(root / name / f"{i:03d}.png")


def test_shapes_and_same_rule_for_every_size():
    net = FeatureNet(FeatureNetConfig(num_classes=3, size=32)).eval()
    big = torch.randint(0, 256, (2, 3, 50, 70), dtype=torch.uint8)
    with torch.no_grad():
        out = net(big)
        direct = net.features(net.preprocess(big))
    assert out["pool"].shape == (2, 128) and out["logits"].shape == (2, 3)
    assert out["spatial"].shape == (2, net.config.spatial_dim) == (2, 4 * 4 * 8)  # second-to-last stage: 32 / 8 = 4
    torch.testing.assert_close(out["pool"], direct["pool"])
    assert net.preprocess(big).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="multiple of 16"):
        FeatureNetConfig(num_classes=3, size=30)


def test_train_save_load_and_spec(tmp_path):
    data = tmp_path / "data"
    write_two_colour_folder(data)
    out = tmp_path / "fnet.pt"
    assert featurenet_cmd.main(["--data", str(data), "--out", str(out), "--epochs", "6", "--size", "16",
                                "--batch-size", "16"]) == 0
    payload = torch.load(out, weights_only=True)
    assert payload["classes"] == ["blue", "red"] and "NOT comparable" in payload["note"]
    assert payload["report"]["train_acc"] >= 0.9, payload["report"]
    net = load_featurenet(out)
    assert "NOT Inception" in net.name and net.config.size == 16
    extractor = load_feature_extractor(f"featurenet:{out}")
    assert extractor.name == net.name and extractor.dims == {"pool": 128, "spatial": 2 * 2 * 8, "logits": 2}
    write_two_colour_folder(tmp_path / "held_out", per_class=4, seed=1)
    for label, name in enumerate(["blue", "red"]):
        for path in sorted((tmp_path / "held_out" / name).iterdir()):
            image = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)[None]
            assert int(extractor(image)["logits"].argmax()) == label, path


def test_bad_specs_and_files(tmp_path):
    with pytest.raises(ValueError, match="featurenet:PATH"):
        load_feature_extractor("featurenet")
    with pytest.raises(ValueError, match="unknown feature spec"):
        load_feature_extractor("clip")
    with pytest.raises(FileNotFoundError, match="featurenet --data"):
        load_featurenet(tmp_path / "nope.pt")
    torch.save({"kind": "other"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a featurenet file"):
        load_featurenet(tmp_path / "other.pt")
    net = FeatureNet(FeatureNetConfig(num_classes=2, size=16))
    save_featurenet(net, tmp_path / "a.pt", classes=["x", "y"], report={})
    assert load_featurenet(tmp_path / "a.pt").name.startswith("featurenet-")
    old = torch.load(tmp_path / "a.pt", weights_only=True)
    del old["arch_version"]  # a file from before the architecture changed must not load into the new one
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="architecture version 1"):
        load_featurenet(tmp_path / "old.pt")
