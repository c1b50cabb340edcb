"""A resumed fit continues the run that wrote the checkpoint: other net/model settings refused, other data or a finished
run warned about, run settings free; validate says which config values the checkpoint replaces."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers.fit import fit_args
from helpers.shards import write_latent_shards
from nit_lightning.cli.lightning import EXIT_USER_ERROR, main
from nit_lightning.records import CheckpointMeta

CKPT = Path("outputs/debug/checkpoints/last.ckpt")  # debug.yaml's ModelCheckpoint, relative to the run's directory


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A 2-step NiT-debug run (max_steps=2): its directory, its training shards, other shards."""
    root = tmp_path_factory.mktemp("provenance")
    shards = write_latent_shards(root / "shards", num_samples=12)
    other = write_latent_shards(root / "other", num_samples=12, seed=7)
    run, cwd = root / "run", os.getcwd()
    run.mkdir()
    os.chdir(run)
    try:
        assert main(fit_args(shards, max_steps=2)) == 0
    finally:
        os.chdir(cwd)
    return run, shards, other


def _copy_run(finished, tmp_path: Path, monkeypatch) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished[0], run)
    monkeypatch.chdir(run)
    return run


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("python -m nit_lightning fit: error:")][-1]


def test_checkpoints_record_the_data_they_were_trained_on(finished):
    run, shards, _ = finished
    data = CheckpointMeta.from_checkpoint(torch.load(run / CKPT, map_location="cpu", weights_only=True)).data
    assert data["sources"] == [{"path": os.path.realpath(shards), "weight": 1.0}]
    assert data["tokens_per_pack"] == 64 and "num_workers" not in data


def test_rerunning_a_finished_run_on_new_data_warns_loudly(finished, tmp_path, monkeypatch, caplog):
    _copy_run(finished, tmp_path, monkeypatch)
    _, shards, other = finished
    with caplog.at_level(logging.WARNING):  # used to resume, train 0 steps and say nothing
        assert main(fit_args(other, max_steps=2)) == 0
    assert "CHANGED INPUTS" in caplog.text and f"data.sources: checkpoint [{{'path': '{shards}'" in caplog.text
    assert f"config [{{'path': '{other}'" in caplog.text
    assert "FINISHED RUN" in caplog.text and "trainer.max_steps=2: fit trains 0 steps" in caplog.text


@pytest.mark.parametrize("extra, named", [
    (["--model.net", '{"name": "NiT-debug", "num_classes": 10, "depth": 3}'], "model.net.depth: checkpoint 2, config 3"),
    (["--model.lr", "0.002"], "model.lr: checkpoint 0.001, config 0.002"),
])  # fmt: skip
def test_explicit_ckpt_path_with_other_model_settings_is_refused(extra, named, finished, tmp_path, monkeypatch, capsys):
    # used to build the checkpoint's model from its hparams and train it, dropping the --model.* overrides, rc 0
    monkeypatch.chdir(tmp_path)
    run, shards, _ = finished
    assert main(fit_args(shards, max_steps=4) + extra + ["--ckpt_path", str(run / CKPT)]) == EXIT_USER_ERROR
    assert named in _error(capsys)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_auto_resume_into_another_network_is_refused_in_one_line(finished, tmp_path, monkeypatch, capsys):
    _copy_run(finished, tmp_path, monkeypatch)  # used to fail with a traceback in the strict state-dict load
    extra = ["--model.net", '{"name": "NiT-debug", "num_classes": 10, "hidden_size": 128}']
    assert main(fit_args(finished[1], max_steps=4) + extra) == EXIT_USER_ERROR
    assert "model.net.hidden_size: checkpoint 64, config 128" in _error(capsys)


def test_run_settings_may_change_on_resume(finished, tmp_path, monkeypatch, caplog):
    run = _copy_run(finished, tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING):
        assert main(fit_args(finished[1], max_steps=3) + ["--model.activation_checkpointing", "true"]) == 0
    assert "model.activation_checkpointing: checkpoint False, config True" in caplog.text
    assert torch.load(run / CKPT, map_location="cpu", weights_only=True)["global_step"] == 3


def test_validate_says_which_config_values_the_checkpoint_replaces(finished, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    run, shards, _ = finished
    args = ["validate", *fit_args(shards)[1:], "--model.net", '{"name": "NiT-debug", "num_classes": 10, "depth": 3}',
            "--data.val_sources", json.dumps([{"path": str(shards)}]), "--ckpt_path", str(run / CKPT)]
    with caplog.at_level(logging.WARNING):
        assert main(args) == 0  # the checkpoint's depth-2 model is evaluated, and that is said
    assert "replace the config's model.net: checkpoint {'name': 'NiT-debug', 'num_classes': 10}" in caplog.text


def test_resuming_onto_re_prepared_data_warns_loudly_and_restarts_the_epoch(tmp_path, monkeypatch, caplog):
    """Shards prepared again at the same path from other images: the path is the same, the data is not. Before, the
    resume was silent and the saved data position was applied to another plan."""
    shards = write_latent_shards(tmp_path / "shards", num_samples=12)
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    assert main(fit_args(shards, max_steps=2)) == 0
    shutil.rmtree(shards)
    write_latent_shards(shards, num_samples=12, seed=5)  # same folder, other data
    with caplog.at_level(logging.WARNING):
        assert main(fit_args(shards, max_steps=3)) == 0
    assert "CHANGED INPUTS" in caplog.text and "data.content: checkpoint {" in caplog.text
    assert "restarts from its first pack" in caplog.text  # the old position means nothing in the new data
