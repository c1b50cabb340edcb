"""Synthetic set: deterministic bytes, sizes and aspect ratios in range, split, distinct classes, canvas-following shapes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nit_lightning.cli.synth import main as synth_main
from nit_lightning.data.synthetic import FAMILIES, SynthSettings, class_style, render, write_synthetic


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    settings = dict(num_images=30, num_classes=5, min_side=32, max_side=96)
    write_synthetic(SynthSettings(out=str(tmp_path / "a"), seed=3, **settings))
    write_synthetic(SynthSettings(out=str(tmp_path / "b"), seed=3, **settings))
    write_synthetic(SynthSettings(out=str(tmp_path / "c"), seed=4, **settings))
    a, b, c = (_digests(tmp_path / name) for name in "abc")
    assert a == b and len(a) == 31  # 30 PNGs + synth.json
    assert a.keys() == c.keys() and a != c


def test_sizes_aspect_ratios_and_folders(tmp_path):
    manifest = write_synthetic(SynthSettings(out=str(tmp_path), num_images=200, num_classes=10, min_side=32,
                                             max_side=128, seed=0))
    pngs = sorted(tmp_path.rglob("*.png"))
    assert len(pngs) == 200 and manifest["counts"] == {"all": 200}
    sizes = [Image.open(p).size for p in pngs]
    assert all(32 <= w <= 128 and 32 <= h <= 128 for w, h in sizes)
    ratios = [w / h for w, h in sizes]
    assert min(ratios) >= 1 / 3 - 0.02 and max(ratios) <= 3 + 0.06  # rounding of the short side to whole pixels
    assert min(ratios) < 0.5 and max(ratios) > 2  # both orientations, strongly elongated ones included
    snapped = sum(w % 8 == 0 and h % 8 == 0 for w, h in sizes)
    assert 60 < snapped < 160  # about half on multiples of 8 (the rest free, a few of those by chance)
    assert len(set(sizes)) > 100
    folders = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert folders == [c["folder"] for c in manifest["classes"]] and len(folders) == 10
    assert all(len(list((tmp_path / f).glob("*.png"))) == 20 for f in folders)  # balanced


def test_min_long_side_keeps_range_and_ratios(tmp_path):
    from nit_lightning.data.synthetic import sample_size

    base = SynthSettings(out="", min_side=32, max_side=128)
    longer = SynthSettings(out="", min_side=32, max_side=128, min_long_side=64)
    same = SynthSettings(out="", min_side=32, max_side=128, min_long_side=16)  # ≤ min_side: today's sizes exactly
    a = [sample_size(np.random.default_rng([0, i]), base) for i in range(300)]
    assert a == [sample_size(np.random.default_rng([0, i]), same) for i in range(300)]
    b = [sample_size(np.random.default_rng([0, i]), longer) for i in range(300)]
    assert all(64 <= max(hw) <= 128 and min(hw) >= 32 for hw in b) and min(max(hw) for hw in a) < 64
    assert max(max(hw) / min(hw) for hw in b) > 2.5  # elongated images stay (short side down to min_side)
    with pytest.raises(ValueError, match="min_long_side 200 must be ≤ max_side 128"):
        SynthSettings(out="", max_side=128, min_long_side=200).validate()


def test_train_val_split_through_command(tmp_path):
    code = synth_main(["--out", str(tmp_path), "--num-images", "50", "--num-classes", "5", "--min-side", "32",
                       "--max-side", "64", "--seed", "1", "--val-fraction", "0.2"])
    assert code == 0
    assert len(list((tmp_path / "train").rglob("*.png"))) == 40
    assert len(list((tmp_path / "val").rglob("*.png"))) == 10
    assert json.loads((tmp_path / "synth.json").read_text())["counts"] == {"train": 40, "val": 10}
    assert synth_main(["--out", str(tmp_path / "bad"), "--min-side", "300", "--max-side", "64"]) == 2


def test_classes_are_separable_by_nearest_centroid():
    """Thumbnails 8×8 of 10 classes: a nearest-centroid classifier is far above chance (10%)."""
    rng = np.random.default_rng(0)
    features, labels = [], []
    for i in range(200):
        k = i % 10
        h, w = int(rng.integers(32, 97)), int(rng.integers(32, 97))
        thumb = Image.fromarray(render(k, (h, w), rng)).resize((8, 8), Image.BILINEAR)
        features.append(np.asarray(thumb, dtype=np.float32).ravel() / 255)
        labels.append(k)
    x, y = np.stack(features), np.array(labels)
    centroids = np.stack([x[:100][y[:100] == k].mean(0) for k in range(10)])
    predicted = np.argmin(((x[100:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (predicted == y[100:]).mean() > 0.8
    assert len({class_style(k)["family"] for k in range(10)}) == len(FAMILIES)


def test_bar_lies_along_the_long_side():
    bar = FAMILIES.index("bar")
    for h, w in ((32, 96), (96, 32)):
        image = render(bar, (h, w), np.random.default_rng(1)).astype(np.float32)
        colour = np.abs(image - np.median(image.reshape(-1, 3), axis=0)).sum(-1) > 120  # object pixels
        rows, cols = np.nonzero(colour)
        extent_h, extent_w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert (extent_w > 2 * extent_h) if w > h else (extent_h > 2 * extent_w)


def test_other_settings_into_the_same_folder_are_refused_not_mixed(tmp_path, capsys):
    # Before: 20 images, then 10 with other sizes: the 10 were overwritten and the other 10 stayed, stale, next to them.
    base = ["--out", str(tmp_path / "set"), "--num-classes", "2", "--min-side", "32", "--max-side", "64"]
    assert synth_main(base + ["--num-images", "20"]) == 0
    before = _digests(tmp_path / "set")
    assert synth_main(base + ["--num-images", "10", "--max-side", "48"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (max_side 64 -> 48, num_images 20 -> 10)" in err[0]
    assert _digests(tmp_path / "set") == before  # untouched
    assert synth_main(base + ["--num-images", "20"]) == 0 and _digests(tmp_path / "set") == before  # same: rewritten


def test_a_cut_short_set_resumes_and_a_foreign_folder_is_refused(tmp_path):
    settings = SynthSettings(out=str(tmp_path / "set"), num_images=6, num_classes=2, min_side=32, max_side=48)
    write_synthetic(settings)
    complete = _digests(tmp_path / "set")
    (tmp_path / "set" / "synth.json").unlink()  # as if killed before the end: only the partial marker says what it is
    (tmp_path / "set" / "synth.partial.json").write_text(json.dumps({"settings": {
        k: v for k, v in settings.__dict__.items() if k != "out"}}))
    write_synthetic(settings)
    assert _digests(tmp_path / "set") == complete and not (tmp_path / "set" / "synth.partial.json").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("do not delete")
    with pytest.raises(ValueError, match="not empty and holds no synth.json"):
        write_synthetic(SynthSettings(out=str(tmp_path / "mine"), num_images=2))
