"""The CPU demo: settings and config plumbing (fast), and a `--quick --ablation` end-to-end run + resume (slow)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from nit_lightning.demo.data import DemoPaths
from nit_lightning.demo.pipeline import check_settings
from nit_lightning.demo.report import size_kind
from nit_lightning.demo.settings import make_settings
from nit_lightning.demo.train import run_config


def test_settings_reject_unbalanced_sample_counts_and_bad_sizes():
    with pytest.raises(ValueError, match="num_samples=15 must be a multiple of num_classes=10"):
        make_settings(num_samples=15)
    with pytest.raises(ValueError, match="100x100 is not a multiple of the codec factor 8"):
        make_settings(sizes=("100x100",))
    with pytest.raises(ValueError, match="unknown demo settings"):
        make_settings(bogus=1)


def test_runs_and_modes_follow_the_ablation_flag():
    assert make_settings().runs() == {"native": ["native"]}
    ablation = make_settings(ablation=True)
    assert ablation.runs() == {"native": ["native"], "mix": ["native", "fixed-64", "fixed-128"],
                               "fixed": ["fixed-64", "fixed-128"]}
    assert ablation.modes() == ["native", "fixed-64", "fixed-128"]


def test_size_kinds_relative_to_the_training_sides():
    s = make_settings()  # training sides 32..128 px, aspect ratios 1:3..3:1
    assert [size_kind(x, s) for x in ("64x64", "128x128", "192x192", "64x192", "192x64", "32x96", "160x96")] == [
        "seen", "seen", "unseen size", "unseen size, H:W 1:3", "unseen size, H:W 3:1", "seen", "unseen size, H:W 5:3"]


def test_run_config_fills_in_data_outputs_and_sizes(tmp_path):
    s = make_settings(str(tmp_path), ablation=True)
    config = run_config(s, DemoPaths(tmp_path), "mix", s.runs()["mix"])
    assert [src["path"] for src in config["data"]["sources"]] == [
        str(tmp_path / "data" / "shards" / m) for m in ("native", "fixed-64", "fixed-128")]
    assert config["trainer"]["max_steps"] == s.train_steps
    assert config["model"]["net"] == {"name": "NiT-debug", "depth": s.depth, "hidden_size": s.hidden_size,
                                      "num_heads": s.num_heads, "num_classes": 10}
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c["init_args"] for c in config["trainer"]["callbacks"]}
    assert callbacks["ModelCheckpoint"]["dirpath"] == str(tmp_path / "runs" / "mix" / "checkpoints")
    assert callbacks["SampleGridCallback"]["sizes"] == list(s.sizes)
    assert callbacks["SampleGridCallback"]["at_train_end"] is True
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == str(tmp_path / "runs" / "mix")


def test_resume_into_an_out_with_other_settings_is_refused(tmp_path):
    check_settings(make_settings(str(tmp_path)), tmp_path)
    check_settings(make_settings(str(tmp_path), ablation=True, threads=1), tmp_path)  # flags may change
    with pytest.raises(ValueError, match="train_steps"):
        check_settings(make_settings(str(tmp_path), train_steps=5), tmp_path)


def test_demo_command_reports_bad_settings_with_exit_code_2(tmp_path, capsys):
    from nit_lightning.cli.demo import main

    assert main(["--out", str(tmp_path), "--num-samples", "7"]) == 2
    assert "num_samples=7" in capsys.readouterr().err


@pytest.fixture(scope="module")
def quick_ablation(tmp_path_factory) -> tuple[Path, dict]:
    from nit_lightning.demo.pipeline import run_demo

    out = tmp_path_factory.mktemp("demo")
    result = run_demo(make_settings(str(out), ablation=True, quick=True, threads=1))
    return out, result


@pytest.mark.slow
def test_quick_ablation_runs_end_to_end(quick_ablation):
    out, result = quick_ablation
    s = make_settings(str(out), ablation=True, quick=True)
    for mode in ("native", "fixed-32", "fixed-64"):
        assert (out / "data" / "shards" / mode / "index.json").is_file()
    for run in ("native", "mix", "fixed"):
        assert (out / "runs" / run / "checkpoints" / "final.ckpt").is_file()
        assert list((out / "runs" / run / "grids").glob("step*_32x96.png")), "sample grids at an unseen AR"
        assert list((out / "runs" / run / "tb").glob("events.out.tfevents.*")), "TensorBoard log"
        metrics = json.loads((out / "runs" / run / "metrics.json").read_text())["featurenet"]
        assert sorted(metrics) == sorted(s.sizes)
        for row in metrics.values():
            assert row["num_samples"] == s.num_samples and "NOT Inception" in row["features"]
            for key in ("fid", "sfid", "is", "precision", "recall", "class_acc"):
                assert math.isfinite(row[key]), (run, key, row[key])
        config = yaml.safe_load((out / "runs" / run / "config.yaml").read_text())
        assert len(config["data"]["sources"]) == len(s.runs()[run])
    report = (out / "report.md").read_text()
    assert "demo CNN, not Inception" in report and "Ablation summary" in report
    assert "tensorboard --logdir" in report
    timings = json.loads((out / "timings.json").read_text())
    assert {"1-synth", "2-prepare-native", "3-train-mix", "4-sample-fixed", "5c-evaluate-native"} <= set(timings)


@pytest.mark.slow
def test_rerun_reuses_every_finished_step(quick_ablation):
    from nit_lightning.demo.pipeline import run_demo

    out, first = quick_ablation
    again = run_demo(make_settings(str(out), ablation=True, quick=True, threads=1))
    assert all(record.get("reused_now") for record in again["timings"].values()), again["timings"]
    assert again["metrics"] == first["metrics"]
