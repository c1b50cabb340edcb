"""Synthetic captioned set: deterministic bytes, colour and shape independent, held-out pairs never in training,
caption files beside images, the palette readable back from the pixels and documented, sizes like the synth set."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nit_lightning.data.synthetic import FAMILIES, SynthSettings, sample_size
from nit_lightning.data.synthetic_captions import (
    PALETTE,
    CaptionedSynthSettings,
    caption,
    held_out_pairs,
    possible_captions,
    render_object,
    write_captioned_synthetic,
)
from nit_lightning.data.tinytext import vocabulary_of

DOCS = Path(__file__).resolve().parents[1] / "docs" / "t2i.md"


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_settings_same_bytes_other_seed_other_bytes(tmp_path):
    kw = dict(num_images=24, min_side=32, max_side=64, small_fraction=0.3)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        write_captioned_synthetic(CaptionedSynthSettings(out=str(tmp_path / name), seed=seed, **kw))
    a, b, c = (_digests(tmp_path / name) for name in "abc")
    assert a == b and len(a) == 2 * 24 + 2  # PNG + TXT per image, captions.jsonl, synth.json
    assert a.keys() == c.keys() and a != c


def test_pairs_captions_files_and_held_out_set(tmp_path):
    manifest = write_captioned_synthetic(CaptionedSynthSettings(
        out=str(tmp_path), num_images=140, min_side=32, max_side=96, val_fraction=0.1, held_out_images=20,
        small_fraction=0.25))
    held = {tuple(p) for p in manifest["held_out"]}
    seen = {tuple(p) for p in manifest["seen"]}
    assert len(held) == 10 and not held & seen and len(held | seen) == len(PALETTE) * len(FAMILIES)
    assert {f for _, f in held} == set(FAMILIES) and len({c for c, _ in held}) == len(PALETTE)  # spread out
    lines = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert manifest["counts"] == {"train": 126, "val": 14, "heldout": 20} and len(lines) == 160
    for line in lines:
        image = tmp_path / line["file"]
        assert image.is_file() and image.with_suffix(".txt").read_text() == line["caption"] + "\n"
        assert line["caption"] == caption(line["colour"], line["shape"], line["small"])
        assert ((line["colour"], line["shape"]) in held) == (line["split"] == "heldout")
        assert image.parent.name == line["split"]
    train = [(line["colour"], line["shape"]) for line in lines if line["split"] == "train"]
    # Balanced: 126 training images over 70 seen pairs, each pair once or twice; every colour with every shape it may.
    counts = {pair: train.count(pair) for pair in seen}
    assert set(counts.values()) <= {1, 2} and sum(counts.values()) == 126
    assert 0.1 < sum(line["small"] for line in lines) / len(lines) < 0.4
    # The held-out set is a function of held_out_seed alone.
    assert held == set(held_out_pairs(tuple(PALETTE), 1, 0)) != set(held_out_pairs(tuple(PALETTE), 1, 1))


def test_captions_read_well_and_the_vocabulary_covers_held_out_pairs():
    assert caption("red", "triangle") == "a red triangle"
    assert caption("blue", "ring", small=True) == "a small blue ring"
    assert caption("orange", "disc") == "an orange disc" and caption("red", "stripes") == "red stripes"
    assert caption("green", "checker") == "a green checkerboard"
    words = set(vocabulary_of(possible_captions()))
    assert set(PALETTE) <= words and {"small", "a", "an", "checkerboard", "stripes"} <= words


def test_object_colour_reads_back_as_its_palette_entry():
    names, rgbs = list(PALETTE), np.array(list(PALETTE.values()), dtype=np.float32)
    for colour in PALETTE:
        for family in ("disc", "diamond", "cross"):  # shapes that cover the centre of the canvas
            image = render_object(colour, family, False, (64, 96), np.random.default_rng([7, len(colour)]))
            centre = image[28:36, 40:56].reshape(-1, 3).astype(np.float32).mean(0)
            assert names[int(np.argmin(((rgbs - centre) ** 2).sum(1)))] == colour, (colour, family, centre)


def test_sizes_follow_the_synth_rules(tmp_path):
    settings = CaptionedSynthSettings(out=str(tmp_path), num_images=30, min_side=32, max_side=128, seed=5)
    write_captioned_synthetic(settings)
    lines = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    sizes = [Image.open(tmp_path / line["file"]).size[::-1] for line in lines]  # (H, W)
    synth = SynthSettings(out="", min_side=32, max_side=128, seed=5)
    assert sizes == [sample_size(np.random.default_rng([5, i]), synth) for i in range(30)]
    assert len(set(sizes)) > 20 and min(w / h for h, w in sizes) < 0.6 < 1.6 < max(w / h for h, w in sizes)


def test_bad_settings_and_other_sets_are_refused(tmp_path):
    bad = [dict(colours=("red", "green", "blue")), dict(colours=("red", "mauve", "green", "blue", "cyan", "white")),
           dict(held_out_per_shape=8), dict(small_fraction=1.5), dict(held_out_per_shape=0, held_out_images=3)]
    for kw in bad:
        with pytest.raises(ValueError):
            write_captioned_synthetic(CaptionedSynthSettings(out=str(tmp_path / "x"), **kw))
    write_captioned_synthetic(CaptionedSynthSettings(out=str(tmp_path / "y"), num_images=3, max_side=48))
    with pytest.raises(ValueError, match="other settings"):
        write_captioned_synthetic(CaptionedSynthSettings(out=str(tmp_path / "y"), num_images=4, max_side=48))


def test_palette_is_documented_with_its_rgb_values():
    text = DOCS.read_text()
    for name, (r, g, b) in PALETTE.items():
        assert re.search(rf"\|\s*{name}\s*\|\s*\({r}, {g}, {b}\)\s*\|", text), f"{name} ({r}, {g}, {b}) not in {DOCS}"
