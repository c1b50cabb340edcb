"""The demo feature network: shapes, one preprocessing rule for every size, training, saving, loading by spec."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nit_lightning.cli import featurenet as featurenet_cmd
from nit_lightning.evaluation.classifiers import train_featurenet
from nit_lightning.evaluation.extractors import load_feature_extractor
from nit_lightning.evaluation.featurenet import FeatureNet, FeatureNetConfig, load_featurenet, save_featurenet


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
    with pytest.raises(ValueError, match="format version 1"):
        load_featurenet(tmp_path / "old.pt")


# ---- the shape classifier (input "gray-std") ----

def test_gray_standardise_removes_colour_and_brightness():
    from nit_lightning.evaluation.featurenet import gray_standardise

    flat = torch.stack([torch.full((3, 8, 8), v) for v in (-0.5, 0.0, 0.9)])
    assert torch.equal(gray_standardise(flat), torch.zeros(3, 1, 8, 8))
    x = torch.rand(4, 3, 16, 12) * 2 - 1
    g = gray_standardise(x)
    assert g.shape == (4, 1, 16, 12)
    torch.testing.assert_close(g.mean(dim=(2, 3)), torch.zeros(4, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(g.std(dim=(2, 3)), torch.ones(4, 1), atol=1e-5, rtol=0)
    # The same layout in another colour and contrast is the same input.
    torch.testing.assert_close(gray_standardise(0.3 * x + 0.2), g, atol=1e-4, rtol=0)
    net = FeatureNet(FeatureNetConfig(num_classes=3, size=16, input="gray-std"))
    assert net.stages[0][0].in_channels == 1 and net.preprocess(torch.zeros(2, 3, 20, 30, dtype=torch.uint8)).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="input 'hsv' is not one of"):
        FeatureNetConfig(num_classes=3, input="hsv")


@pytest.fixture(scope="module")
def synth_classifiers(tmp_path_factory):
    """A shape classifier and an RGB feature net trained on the same small synthetic set (measured: ~7 s each)."""
    from nit_lightning.data.synthetic import SynthSettings, write_synthetic

    root = tmp_path_factory.mktemp("shape")
    write_synthetic(SynthSettings(out=str(root / "train"), num_images=300, num_classes=10, min_side=32, max_side=64))
    nets = {}
    for input in ("gray-std", "rgb"):
        path = root / f"{input}.pt"
        train_featurenet(root / "train", path, epochs=8, size=32, batch_size=32, input=input)
        nets[input] = path
    return nets


def held_out_renders(hw=(48, 64), n=100):
    from nit_lightning.data.synthetic import render

    labels = [i % 10 for i in range(n)]
    return [torch.from_numpy(render(k, hw, np.random.default_rng([99, i]))).permute(2, 0, 1)
            for i, k in enumerate(labels)], labels


def test_shape_classifier_accuracy_on_real_images(synth_classifiers, tmp_path):
    from nit_lightning.evaluation.classifiers import accuracy, shape_accuracy

    images, labels = held_out_renders()
    acc = shape_accuracy(images, labels, synth_classifiers["gray-std"])
    assert acc >= 0.6, acc  # chance 0.1; measured 0.85 (300 training images, 8 epochs at 32 px)
    assert "shape classifier" in load_featurenet(synth_classifiers["gray-std"]).name
    # The same numbers from every accepted form: tensor batch, NHWC array, ADM npz with arr_1, an extractor.
    batch = torch.stack(images)
    nhwc = batch.permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "s.npz", arr_0=nhwc, arr_1=np.array(labels))
    extractor = load_feature_extractor(f"featurenet:{synth_classifiers['gray-std']}")
    for form in (shape_accuracy(batch, labels, extractor), shape_accuracy(nhwc, labels, synth_classifiers["gray-std"]),
                 shape_accuracy(tmp_path / "s.npz", None, synth_classifiers["gray-std"])):
        assert form == acc
    # Mixed sizes in one list: each image is resized by the same rule.
    mixed, mixed_labels = held_out_renders((64, 32), 10)
    assert 0.0 <= accuracy(images[:10] + mixed, labels[:10] + mixed_labels, synth_classifiers["gray-std"]) <= 1.0
    with pytest.raises(ValueError, match="100 images but 99 labels"):
        shape_accuracy(batch, labels[:99], synth_classifiers["gray-std"])
    with pytest.raises(ValueError, match="needs a classifier trained with input 'gray-std'"):
        shape_accuracy(batch, labels, synth_classifiers["rgb"])
    np.savez(tmp_path / "nolabels.npz", arr_0=nhwc)
    with pytest.raises(ValueError, match="has no arr_1"):
        shape_accuracy(tmp_path / "nolabels.npz", None, synth_classifiers["gray-std"])


def test_colour_alone_cannot_be_classified(synth_classifiers):
    """Flat images in each class's own colour: the RGB net tells many apart, the shape classifier none (chance)."""
    import colorsys

    from nit_lightning.data.synthetic import class_style
    from nit_lightning.evaluation.classifiers import accuracy, shape_accuracy

    labels = list(range(10)) * 2
    images = []
    for k in labels:
        rgb = np.array(colorsys.hsv_to_rgb(class_style(k)["hue"], 0.8, 0.85)) * 255
        images.append(torch.from_numpy(np.broadcast_to(rgb.round().astype(np.uint8), (40, 56, 3)).copy()).permute(2, 0, 1))
    assert accuracy(images, labels, synth_classifiers["rgb"]) >= 0.3  # colour is a strong cue for the RGB net
    # Every flat image becomes the same all-zero input: one prediction for all, right for exactly one class in ten.
    assert shape_accuracy(images, labels, synth_classifiers["gray-std"]) == pytest.approx(0.1)
