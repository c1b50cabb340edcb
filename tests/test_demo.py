"""The CPU demo: config plumbing (fast), and the quick config's ablation end to end + resume (slow)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from nit_lightning.demo.config import fill, load_config
from nit_lightning.demo.report import size_kind
from nit_lightning.demo.run import run_demo
from nit_lightning.demo.steps import Demo

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
DEMO, QUICK = EXPERIMENTS / "demo.yaml", EXPERIMENTS / "demo_quick.yaml"


def test_config_extends_and_fills_only_its_placeholders(tmp_path):
    quick = load_config(QUICK)
    full = load_config(DEMO)
    assert quick["images"]["num_images"] == 240 and quick["images"]["val_fraction"] == full["images"]["val_fraction"]
    demo = Demo(full, tmp_path, ablation=True)
    # the config's own seed keeps the plain names, so `--ablation` after a plain demo reuses its `native` run
    assert list(demo.runs()) == ["native", "mix", "fixed", "native-s1", "mix-s1", "fixed-s1"]
    assert Demo(full, tmp_path).runs() == {"native": (["native"], 0)}
    sources = [{"path": "a", "weight": 1.0}]
    config = fill(demo.config["fit"], run="mix-s1", seed=1, sources=sources)
    assert config["data"]["sources"] == sources and config["seed_everything"] == 1 and config["model"]["seed"] == 1
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in config["trainer"]["callbacks"]}
    assert callbacks["ModelCheckpoint"]["dirpath"] == f"{tmp_path}/runs/mix-s1/checkpoints"
    assert "${" not in json.dumps(config)  # every placeholder filled


def test_bad_configs_are_refused(tmp_path):
    (tmp_path / "bad.yaml").write_text("extends: " + str(DEMO) + "\nsmaple: {}\n")
    with pytest.raises(ValueError, match=r"unknown sections \['smaple'\]"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resume_into_an_out_with_other_settings_is_refused(tmp_path):
    config = load_config(QUICK)
    Demo(config, tmp_path).check_settings()
    Demo({**config, "threads": 1}, tmp_path).check_settings()  # run flags may change
    with pytest.raises(ValueError, match=r"a demo made with other settings \(sample\)"):
        Demo({**config, "sample": {**config["sample"], "num_samples": 4}}, tmp_path).check_settings()


def test_size_kinds_relative_to_the_training_sides(tmp_path):
    demo = Demo(load_config(DEMO), tmp_path)  # training sides 32..128 px, aspect ratios 1:3..3:1
    assert [size_kind(x, demo) for x in ("64x64", "128x128", "192x192", "64x192", "192x64", "32x96", "160x96")] == [
        "seen", "seen", "unseen size", "unseen size, H:W 1:3", "unseen size, H:W 3:1", "seen", "unseen size, H:W 5:3"]


def test_demo_command_reports_bad_settings_with_exit_code_2(tmp_path, capsys):
    from nit_lightning.demo.command import main

    assert main(["--config", str(tmp_path / "nope.yaml"), "--out", str(tmp_path)]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert main(["--config", str(QUICK), "--out", str(tmp_path), "--sweep", str(EXPERIMENTS / "sweeps" / "x.yaml")]) == 2
    assert "make demo" in capsys.readouterr().err  # no trained demo model yet


@pytest.fixture(scope="module")
def quick_ablation(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(load_config(QUICK), out, ablation=True, threads=1)


@pytest.mark.slow
def test_quick_ablation_runs_end_to_end(quick_ablation):
    out, result = quick_ablation
    config = load_config(QUICK)
    for mode in ("native", "fixed-32", "fixed-64"):
        assert (out / "data" / "shards" / mode / "index.json").is_file()
    for run, modes in config["runs"].items():
        assert (out / "runs" / run / "checkpoints" / "final.ckpt").is_file()
        assert list((out / "runs" / run / "grids").glob("step*_32x96.png")), "sample grids at an unseen AR"
        assert list((out / "runs" / run / "tb").glob("events.out.tfevents.*")), "TensorBoard log"
        metrics = json.loads((out / "runs" / run / "metrics.json").read_text())["featurenet"]
        assert sorted(metrics) == sorted(config["sample"]["sizes"])
        for row in metrics.values():
            assert row["num_samples"] == config["sample"]["num_samples"] and "NOT Inception" in row["features"]
            for key in ("fid", "sfid", "is", "precision", "recall", "class_acc", "shape_acc"):
                assert math.isfinite(row[key]), (run, key, row[key])
        fit = yaml.safe_load((out / "runs" / run / "config.yaml").read_text())
        assert len(fit["data"]["sources"]) == len(modes)
    report = (out / "report.md").read_text()
    assert "demo CNNs, not Inception" in report and "Ablation summary" in report and "shape acc" in report
    assert "tensorboard --logdir" in report and "the ceiling" in report and "held-out val images" in report
    assert "over 8 samples has a standard error of 0.14" in report  # sqrt(0.8 * 0.2 / 8)
    assert all((out / "runs" / run / "samples_grid.png").is_file() for run in config["runs"])
    timings = json.loads((out / "timings.json").read_text())
    assert {"1-images", "2b-shards-native", "3-shape", "4-fit-mix", "5-sample-fixed", "6-evaluate-native"} <= set(timings)


@pytest.mark.slow
def test_the_demo_model_carries_its_recipe_and_is_looked_at_where_people_look(quick_ablation, tmp_path):
    """The checkpoint records the config's sampler and its trained token range; `sample` with no sampler flags
    samples the demo model as the demo does (RoPE interpolated beyond the trained 8 tokens); the report embeds the
    charts and labelled grids; TensorBoard grids include an unseen aspect ratio."""
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from nit_lightning.cli.sample import main as sample_main
    from nit_lightning.data.shards import load_index
    from nit_lightning.records import CheckpointMeta, SettingsRecord

    out, _ = quick_ablation
    config = load_config(QUICK)
    ckpt = out / "runs" / "native" / "checkpoints" / "final.ckpt"
    recipe = CheckpointMeta.from_checkpoint(torch.load(ckpt, weights_only=True), ckpt).recipe
    lengths = [n for shard in load_index(out / "data" / "shards" / "native")["shards"] for n in shard["lengths"]]
    assert recipe.sampler == config["fit"]["model"]["sampler"] and recipe.trained_tokens == [min(lengths), max(lengths)]
    assert recipe.trained_side == 8  # 64 px sides of 8 px tokens
    demo_sampler = SettingsRecord.read(out / "runs" / "native" / "samples" / "32x96" / "provenance.json").settings
    assert sample_main(["--ckpt", str(ckpt), "--sizes", "32x96", "--out", str(tmp_path / "s"), "--device", "cpu",
                        "--no-progress", "--num-samples", str(config["sample"]["num_samples"])]) == 0
    mine = SettingsRecord.read(tmp_path / "s" / "32x96" / "provenance.json").settings
    assert mine["sampler"] == demo_sampler["sampler"] and mine["sampler"]["rope_interp_side"] == 8
    assert (tmp_path / "s" / "grid.png").is_file()
    report = (out / "report.md").read_text()
    assert "plots/metrics_vs_side.png" in report and "plots/metrics_vs_aspect.png" in report
    assert (out / "plots" / "metrics_vs_side.png").is_file() and (out / "plots" / "metrics_vs_aspect.png").is_file()
    events = EventAccumulator(str(out / "runs" / "native" / "tb"), size_guidance={"images": 0}).Reload()
    assert {"samples/seen/32x32", "samples/seen/64x64", "samples/unseen/32x96"} <= set(events.Tags()["images"])


@pytest.mark.slow
def test_rerun_reuses_every_finished_step(quick_ablation):
    out, first = quick_ablation
    again = run_demo(load_config(QUICK), out, ablation=True, threads=1)
    assert all(record.get("reused_now") for record in again["timings"].values()), again["timings"]
    assert again["metrics"] == first["metrics"]


@pytest.mark.slow
def test_demo_scale_sweep_on_the_trained_model(quick_ablation, tmp_path):
    from nit_lightning.demo.command import main

    out, _ = quick_ablation
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("name: toy\nsettings:\n  - {size: 32x64, method: euler, steps: 2, cfg_scale: 2.0}\n")
    assert main(["--config", str(QUICK), "--out", str(out), "--sweep", str(sweep), "--threads", "1"]) == 0
    results = json.loads((out / "sweeps" / "sweep" / "results.json").read_text())
    table = (out / "sweeps" / "sweep" / "results.md").read_text()
    assert results["results"]["32x64"]["status"] == "ok" and "NOT the FID Inception" in table
    metrics = results["results"]["32x64"]["metrics"]
    assert "| class_acc | shape_acc |" in table and 0 <= metrics["class_acc"] <= 1 and 0 <= metrics["shape_acc"] <= 1


def test_demo_sweep_files_fit_the_demo_codec():
    from nit_lightning.generation.settings import load_sweep

    codec = load_config(DEMO)["codec"]
    kind, _, arg = codec["spec"].partition(":")
    factor = int(arg) if kind == "pixel" else int(codec["tinyae"]["config"]["factor"])
    for name in ("demo_resolution", "demo_aspect_ratio"):
        sweep = load_sweep(EXPERIMENTS / "sweeps" / f"{name}.yaml")
        assert all(h % factor == 0 and w % factor == 0 for h, w in (s.size for s in sweep.settings)), name
