"""A checkpoint carries its sampling recipe (issue 22, item 1): training records the recommended sampler and the token
grids it saw; `sample` uses them unless a flag says otherwise, says where each value came from, interpolates RoPE
beyond the trained range by default, makes a grid-sized set by default and always writes a labelled grid.png."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers.nets import random_debug_net, write_lightning_checkpoint
from nit_lightning.cli.sample import main as sample_main
from nit_lightning.generation.grid import labelled_grid, wrap
from nit_lightning.generation.recipe import default_grid_sizes, default_num_samples, resolve_sampler, size_kind
from nit_lightning.generation.sample_set import first_images
from nit_lightning.records import CheckpointMeta, SamplingRecipe, SettingsRecord

DEMO_SAMPLER = {"method": "heun", "steps": 8, "cfg_scale": 3.0, "cfg_interval": [0.0, 0.9]}


def _provenance(folder: Path) -> dict:
    return SettingsRecord.read(folder / "provenance.json", "sample-set").settings


def test_flags_override_the_recipe_which_overrides_the_defaults():
    recipe = SamplingRecipe(sampler=DEMO_SAMPLER, trained_tokens=[4, 256])
    resolved = resolve_sampler({}, recipe)
    assert (resolved.sampler.method, resolved.sampler.steps, resolved.sampler.cfg_scale) == ("heun", 8, 3.0)
    assert resolved.sampler.rope_interp_side == 16  # beyond a 16x16 token grid: positions interpolated
    assert resolved.origins["method"] == "checkpoint recipe" and resolved.origins["precision"] == "default"
    assert resolved.origins["rope_interp_side"].startswith("checkpoint recipe: trained on 4..256 tokens")
    flagged = resolve_sampler({"steps": 3, "cfg": 2.0}, recipe)
    assert (flagged.sampler.steps, flagged.sampler.cfg_scale, flagged.sampler.method) == (3, 2.0, "heun")
    assert flagged.origins["steps"] == flagged.origins["cfg_scale"] == "flag"
    assert "steps 3 (flag)" in flagged.describe() and "method heun (checkpoint recipe)" in flagged.describe()
    assert resolve_sampler({}, recipe, rope_interp=False).sampler.rope_interp_side is None
    assert resolve_sampler({"rope_interp_side": 12}, recipe).sampler.rope_interp_side == 12
    with pytest.raises(ValueError, match="contradict"):
        resolve_sampler({"rope_interp_side": 12}, recipe, rope_interp=False)
    bare = resolve_sampler({}, None)  # official weights: nothing recorded, the defaults, RoPE as trained
    assert (bare.sampler.method, bare.sampler.steps, bare.sampler.rope_interp_side) == ("euler", 50, None)
    with pytest.raises(ValueError, match="recommended sampler"):
        resolve_sampler({}, SamplingRecipe(sampler={"stepz": 3}))


def test_the_recipe_round_trips_through_the_checkpoint_record():
    meta = CheckpointMeta(net_config={"in_channels": 12}, sampling=SamplingRecipe(DEMO_SAMPLER, [4, 256]).as_dict())
    checkpoint = {}
    meta.store(checkpoint)
    recipe = CheckpointMeta.from_checkpoint(checkpoint).recipe
    assert recipe.sampler == DEMO_SAMPLER and recipe.trained_tokens == [4, 256] and recipe.trained_side == 16
    assert CheckpointMeta(net_config={}).recipe == SamplingRecipe()  # before recipes: nothing known
    with pytest.raises(ValueError, match="fewest"):
        SamplingRecipe(trained_tokens=[5, 2])


def test_seen_and_unseen_sizes_and_the_default_grid_sizes_follow_the_trained_range():
    recipe = SamplingRecipe(trained_tokens=[4, 256])  # the demo: sides up to 128 px = 16 tokens of 8 px
    assert default_grid_sizes(recipe, 8) == [(64, 64), (128, 128), (192, 192), (64, 192), (192, 64)]
    assert [size_kind(g, recipe) for g in ((16, 16), (8, 24), (24, 24))] == ["seen", "unseen", "unseen"]
    assert size_kind((16, 16), SamplingRecipe()) is None
    with pytest.raises(ValueError, match="set the callback's sizes"):
        default_grid_sizes(SamplingRecipe(), 8)
    assert default_num_samples(10) == 10 and default_num_samples(1000) == 16


def test_a_labelled_grid_has_a_row_per_size_and_room_for_long_column_labels():
    rows = [("8x8", [np.full((8, 8, 3), 10, np.uint8)] * 3), ("4x12", [np.full((4, 12, 3), 200, np.uint8), None,
                                                                        np.full((4, 12, 3), 90, np.uint8)])]
    short = labelled_grid(rows, ["class 0", "class 1", "class 2"])
    long = labelled_grid(rows, ["class 0", "a photograph of a corgi wearing sunglasses on a beach at dusk", "x"])
    assert long.height > short.height and long.width == short.width  # captions wrap within the column
    lines = wrap("a b c d e f g h i j", 3, len)  # a line holds "a b": 5 lines of words, cut to 4
    assert lines == ["a b", "c d", "e f", "g h …"]


def test_first_images_reads_only_the_start_of_an_adm_npz(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 4, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=images, arr_1=np.arange(7))
    np.testing.assert_array_equal(first_images(tmp_path / "s.npz", 3), images[:3])
    assert first_images(tmp_path / "s.npz", 50).shape == (7, 4, 6, 3)


@pytest.mark.slow
def test_a_fit_records_its_recipe_and_sample_uses_it_by_default(tmp_path, monkeypatch, caplog):
    """Before: `sample` without flags took Euler 50, CFG 1, no RoPE interpolation and 50,000 samples, and wrote no
    grid, whatever the checkpoint had been trained for (the demo model's 256² images came out tiled 2x2)."""
    from helpers.fit import fit_args
    from helpers.shards import write_latent_shards
    from nit_lightning.cli.lightning import main as lightning_main
    from nit_lightning.data.shards import load_index

    monkeypatch.chdir(tmp_path)
    shards = write_latent_shards(tmp_path / "shards", num_samples=16, sides=(2, 5))  # pixel:2, grids 2..5 tokens
    sampler = '{"method": "heun", "steps": 2, "cfg_scale": 3.0, "cfg_interval": [0.0, 0.9]}'
    assert lightning_main(fit_args(shards, max_steps=2) + ["--model.sampler", sampler]) == 0
    ckpt = tmp_path / "outputs" / "debug" / "checkpoints" / "last.ckpt"
    recipe = CheckpointMeta.from_checkpoint(torch.load(ckpt, weights_only=True), ckpt).recipe
    lengths = [n for shard in load_index(shards)["shards"] for n in shard["lengths"]]
    assert recipe.sampler == {"method": "heun", "steps": 2, "cfg_scale": 3.0, "cfg_interval": [0.0, 0.9]}
    assert recipe.trained_tokens == [min(lengths), max(lengths)]
    side = recipe.trained_side

    out = tmp_path / "samples"
    with caplog.at_level(logging.INFO):
        assert sample_main(["--ckpt", str(ckpt), "--sizes", "8x8,16x16", "--out", str(out), "--device", "cpu",
                            "--no-progress"]) == 0
    record = _provenance(out / "16x16")["sampler"]
    assert (record["method"], record["steps"], record["cfg_scale"], record["cfg_interval"]) == ("heun", 2, 3.0,
                                                                                                  [0.0, 0.9])
    assert record["rope_interp_side"] == side and side < 8  # 16 px = 8 tokens: beyond the trained range
    assert len(list((out / "16x16").glob("*.png"))) == 10  # one per class of the 10, not 50,000
    assert "method heun (checkpoint recipe)" in caplog.text and "precision auto (default)" in caplog.text
    assert "one per class" in caplog.text and "--num-samples 50000" in caplog.text
    grid = Image.open(out / "grid.png")
    assert grid.width > 10 * 16 and grid.height > 8 + 16  # 10 class columns, a row per size, labels around them

    off = tmp_path / "off"
    assert sample_main(["--ckpt", str(ckpt), "--sizes", "16x16", "--out", str(off), "--device", "cpu", "--no-progress",
                        "--no-rope-interp", "--steps", "1", "--num-samples", "2"]) == 0
    record = _provenance(off / "16x16")["sampler"]
    assert record["rope_interp_side"] is None and record["steps"] == 1 and record["method"] == "heun"
    assert (off / "grid.png").is_file()


def test_a_checkpoint_without_a_recipe_samples_with_the_defaults_and_says_so(tmp_path, caplog):
    ckpt = write_lightning_checkpoint(tmp_path / "last.ckpt", random_debug_net())
    with caplog.at_level(logging.INFO):
        assert sample_main(["--ckpt", str(ckpt), "--sizes", "8x8", "--out", str(tmp_path / "s"), "--device", "cpu",
                            "--no-progress", "--steps", "1"]) == 0
    assert _provenance(tmp_path / "s" / "8x8")["sampler"]["rope_interp_side"] is None
    assert "records no trained token range" in caplog.text and "method euler (default)" in caplog.text
    assert len(list((tmp_path / "s" / "8x8").glob("*.png"))) == 3  # 3 classes


def test_the_paper_configs_recommend_the_papers_256_sampler():
    import yaml

    from nit_lightning.generation.settings import load_sweep

    experiments = Path(__file__).resolve().parents[1] / "experiments"
    paper = load_sweep(experiments / "sweeps" / "resolution.yaml").select(["256x256"]).settings[0].sampler
    for path in sorted(experiments.glob("nit_*.yaml")):
        sampler = yaml.safe_load(path.read_text())["model"]["sampler"]
        assert resolve_sampler({}, SamplingRecipe(sampler=sampler)).sampler == paper, path.name
