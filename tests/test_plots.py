"""Plots where people look (issue 22, item 2): sweeps chart each metric against side length and aspect ratio with the
published values beside ours, write a sample grid per setting and embed both in results.md; table cells without a
published value stay empty; NFE counts network evaluations."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from nit_lightning.diffusion.guidance import GuidedModel
from nit_lightning.diffusion.sampling import METHODS, model_calls, sample
from nit_lightning.evaluation.plots import aspect_sizes, metric_charts, metric_figure, side_sizes
from nit_lightning.evaluation.sweep import results_markdown, run_sweep
from nit_lightning.generation.settings import SamplerSettings, SizeSetting, load_sweep


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cfg, interval", [(1.0, (0.0, 1.0)), (3.0, (0.0, 0.9)), (2.0, (0.3, 0.7))])
def test_nfe_counts_the_network_evaluations_the_sampler_makes(method, cfg, interval):
    calls = []

    def model_fn(x, t, y, hw):
        calls.append(x.shape[0])
        return torch.zeros_like(x)

    hw = torch.tensor([[2, 3]])
    sample(model_fn, torch.randn(6, 4), torch.tensor([1]), hw, method=method, steps=5, cfg_scale=cfg,
           cfg_interval=interval, null_class=9)
    nfe, guided = model_calls(method, 5, cfg, interval)
    assert nfe == len(calls) and guided == sum(1 for n in calls if n == 12)  # a guided call carries 2x the tokens
    assert model_calls("heun", 8) == (15, 0)  # the demo's Heun 8: 15 evaluations, not "8"


def test_table_cells_without_a_published_value_stay_empty_and_nfe_is_evaluations():
    settings = [SizeSetting((64, 64), SamplerSettings(method="heun", steps=8)),
                SizeSetting((32, 96), SamplerSettings(method="heun", steps=8, cfg_scale=3.0, cfg_interval=(0, 0.9)),
                            {"published": {"fid": 4.5}})]
    metrics = {"fid": 2.5, "sfid": 3.0, "is": 9.0, "precision": 0.5, "recall": 0.25, "num_samples": 10}
    summary = {"name": "t", "num": 10, "features": "inception", "published_model": "NiT-XL",
               "results": {s.name: {"status": "ok", "metrics": metrics} for s in settings}}
    table = results_markdown(summary, settings)
    assert "(–)" not in table and "()" not in table
    assert "| 64x64 | heun 8 | 15 | 1 | [0, 1] | 10 | 2.50 | 3.00 | 9.00 | 0.500 | 0.250 |" in table
    assert "| 32x96 | heun 8 | 15 (13 with CFG) | 3 | [0, 0.9] | 10 | 2.50 (4.50) | 3.00 | " in table


def test_side_and_aspect_charts_pick_their_sizes():
    sizes = [(64, 64), (128, 128), (192, 192), (64, 192), (192, 64)]
    assert side_sizes(sizes) == [(64, 64), (128, 128), (192, 192)]
    assert aspect_sizes(sizes) == [(64, 192), (128, 128), (192, 64)]  # the square of the closest area
    assert side_sizes([(64, 64), (64, 192)]) == [] and aspect_sizes([(64, 64), (128, 128)]) == []


def test_published_values_are_drawn_beside_ours(tmp_path):
    ours = {(256, 256): {"fid": 3.0}, (512, 512): {"fid": 2.5}}
    published = {(256, 256): {"fid": 2.16}, (512, 512): {"fid": 1.57}}
    figure = metric_figure({"ours": ours}, ["fid"], [(256, 256), (512, 512)], "side", published, "NiT-XL", {}, None)
    lines = {line.get_label(): list(line.get_ydata()) for line in figure.axes[0].get_lines()}
    assert lines == {"ours": [3.0, 2.5], "NiT-XL": [2.16, 1.57]}
    paths = metric_charts({"ours": ours}, ["fid", "sfid"], tmp_path, published=published)
    assert [p.name for p in paths] == ["metrics_vs_side.png"] and Image.open(paths[0]).width > 300


def test_a_sweep_writes_charts_and_a_grid_per_setting_and_results_md_embeds_them(tmp_path):
    sizes = ["16x16", "32x32", "16x48", "48x16"]
    settings = [{"size": s, "method": "euler", "steps": 2} for s in sizes]
    settings[0]["published"] = {"fid": 1.0}
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump({"name": "toy", "settings": settings}))
    (tmp_path / "refs").mkdir()
    for s in sizes:
        (tmp_path / "refs" / f"{s}.npz").write_bytes(b"")

    def stub_sample(setting, samples: Path) -> Path:
        h, w = setting.size
        path = samples / setting.name / f"samples_6x{h}x{w}x3.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        images = np.random.default_rng(h * w).integers(0, 256, (6, h, w, 3), dtype=np.uint8)
        np.savez(path, arr_0=images, arr_1=np.arange(6) % 3)
        return path

    def stub_evaluate(samples, ref, extractor, pr_dtype=None):
        h = int(Path(samples).parent.name.split("x")[0])
        return {"fid": float(h), "sfid": 1.0, "is": 2.0, "precision": 0.5, "recall": 0.5, "num_samples": 6}

    import nit_lightning.evaluation.sweep as sweep_module

    class Extractor:  # only its name is read once evaluate_samples is stubbed
        name = "featurenet-test [demo stand-in, NOT Inception]"

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(sweep_module, "evaluate_samples", stub_evaluate)
    try:
        run_sweep(load_sweep(tmp_path / "toy.yaml"), ref_dir=tmp_path / "refs", out=tmp_path / "out", num=6,
                  extractor=Extractor(), sample_fn=stub_sample, tb=False)
    finally:
        monkeypatch.undo()
    out = tmp_path / "out"
    results = (out / "results.md").read_text()
    for picture in ("plots/metrics_vs_side.png", "plots/metrics_vs_aspect.png", *(f"{s}/grid.png" for s in sizes)):
        assert (out / picture).is_file() and f"]({picture})" in results, picture
    grid = Image.open(out / "16x48" / "grid.png")
    assert grid.width > 3 * 48 and grid.height > 16  # one row, 3 classes, labels
