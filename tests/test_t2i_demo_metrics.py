"""The T2I demo's metrics: colour read back exactly on real rendered images, a wrong colour scored wrong, shape by the
gray-std classifier, both-correct per (pair, size) group, binomial standard errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nit_lightning.data.synthetic import FAMILIES
from nit_lightning.data.synthetic_captions import PALETTE, CaptionedSynthSettings, render_object, \
    write_captioned_synthetic
from nit_lightning.demo.t2i_metrics import Rate, format_table, object_colour, predict_shapes, read_captions, score, \
    standard_error, train_shape_classifier
from nit_lightning.evaluation.featurenet import FeatureNet, FeatureNetConfig


@pytest.mark.parametrize("hw", [(32, 32), (32, 96), (96, 32), (64, 64), (128, 80)])
def test_colour_reads_back_on_every_real_pair_plain_and_small(hw):
    wrong = []
    for c, colour in enumerate(PALETTE):
        for f, family in enumerate(FAMILIES):
            for small in (False, True):
                image = render_object(colour, family, small, hw, np.random.default_rng([hw[0], hw[1], c, f, small]))
                got = object_colour(image)
                if got != colour:
                    wrong.append((colour, family, small, got))
    assert not wrong, wrong


def test_a_wrong_colour_is_scored_wrong():
    image = render_object("red", "disc", False, (64, 64), np.random.default_rng(0))
    assert object_colour(image) == "red"
    assert object_colour(image[..., [2, 1, 0]]) == "blue"  # the same disc with red and blue swapped
    assert object_colour(image[..., [1, 0, 2]]) == "green"
    truths = [{"colour": "blue", "shape": "disc", "pair": "seen", "size": "seen"},
              {"colour": "red", "shape": "disc", "pair": "seen", "size": "seen"}]
    result = score([image, image], truths, _ScriptedShapes(["disc", "disc"]))
    assert [r["colour_ok"] for r in result["per_image"]] == [False, True]
    assert result["groups"]["seen/seen"]["both"]["k"] == 1


class _ScriptedShapes(FeatureNet):
    """A gray-std 10-class FeatureNet whose logits name the given shapes in order (to test the bookkeeping)."""

    def __init__(self, shapes):
        super().__init__(FeatureNetConfig(num_classes=len(FAMILIES), size=16, input="gray-std"))
        self.queue = [FAMILIES.index(s) for s in shapes]

    def forward(self, images):
        ks, self.queue = self.queue[:len(images)], self.queue[len(images):]
        return {"logits": torch.nn.functional.one_hot(torch.tensor(ks), len(FAMILIES)).float()}


def test_groups_and_both_correct():
    images = [render_object(c, f, False, hw, np.random.default_rng(i)) for i, (c, f, hw) in enumerate(
        [("red", "disc", (32, 32)), ("blue", "ring", (32, 32)), ("green", "bar", (32, 64)), ("white", "frame", (64, 64))])]
    truths = [{"colour": "red", "shape": "disc", "pair": "seen", "size": "seen"},
              {"colour": "blue", "shape": "ring", "pair": "seen", "size": "seen"},
              {"colour": "green", "shape": "bar", "pair": "held-out", "size": "unseen"},
              {"colour": "white", "shape": "frame", "pair": "held-out", "size": "unseen"}]
    # The classifier sees the images grouped by size, in index order: 32×32 (0, 1), 32×64 (2), 64×64 (3).
    groups = score(images, truths, _ScriptedShapes(["disc", "disc", "bar", "ring"]))["groups"]
    assert groups["seen/seen"]["shape"]["k"] == 1 and groups["seen/seen"]["colour"]["k"] == 2
    assert groups["seen/seen"]["both"] == Rate(1, 2).as_dict()
    assert groups["held-out/unseen"]["both"]["k"] == 1 and groups["held-out/unseen"]["both"]["n"] == 2
    assert "seen/seen | 2 | 0.500 ± 0.354" in format_table(groups)


def test_standard_error_is_the_binomial_one():
    assert standard_error(8, 10) == pytest.approx(math.sqrt(0.8 * 0.2 / 10))
    assert standard_error(64, 80) == pytest.approx(0.04472, abs=1e-5)
    assert standard_error(0, 5) == 0.0 and standard_error(5, 5) == 0.0
    assert math.isnan(standard_error(0, 0))
    assert str(Rate(3, 4)) == "0.750 ± 0.217"


def test_shape_classifier_on_real_captioned_images(tmp_path):
    """Trained on a small captioned set's shapes (gray-std), it names the shapes of other real images, in any colour."""
    write_captioned_synthetic(CaptionedSynthSettings(out=str(tmp_path / "set"), num_images=700, min_side=32,
                                                     max_side=48, seed=0, val_fraction=0.15))
    torch.manual_seed(0)
    train_shape_classifier(tmp_path / "set", tmp_path / "shape.pt", size=32, epochs=6, val_fraction=0.0)
    lines = read_captions(tmp_path / "set", ["val"])
    from nit_lightning.data.imageops import read_rgb

    images = [read_rgb(line["file"]) for line in lines]
    shapes = predict_shapes(images, tmp_path / "shape.pt")
    accuracy = np.mean([s == line["shape"] for s, line in zip(shapes, lines)])
    assert accuracy >= 0.9, accuracy
    assert all(object_colour(im) == line["colour"] for im, line in zip(images, lines))
