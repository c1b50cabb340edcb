"""fit/validate/test/predict exit codes: user errors in one line (rc 2), runs that would do nothing refuse, real failures
keep their traceback."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.fit import REPO, fit_args
from helpers.shards import write_latent_shards
from nit_lightning.cli.lightning import EXIT_USER_ERROR, main


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_latent_shards(tmp_path_factory.mktemp("shards"), num_samples=12)


def _sources(path, weight: float = 1.0, key: str = "path") -> list[str]:
    return ["--data.sources", json.dumps([{key: str(path), "weight": weight}])]


def _one_line_error(capsys, command: str = "fit") -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"python -m nit_lightning {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("extra, error, message", [
    (_sources("/no/such/dir"), FileNotFoundError, "no index.json in /no/such/dir"),
    (_sources("SHARDS", key="pth"), ValueError, "must be a dict with 'path'"),
    (_sources("SHARDS", weight=-1.0), ValueError, "weight -1.0 must be ≥ 0"),
    (["--model.net", '{"name": "NiT-Q"}'], ValueError, "unknown NiT preset 'NiT-Q'"),
    (["--model.lr", "-1"], ValueError, "model.lr=-1.0 must be > 0"),
])  # fmt: skip
def test_user_errors_print_one_line_and_exit_2(extra, error, message, shards, tmp_path, monkeypatch, capsys):
    # each used to print the right message after a traceback
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NIT_TRACEBACK", raising=False)
    args = fit_args(shards, max_steps=1) + [a.replace("SHARDS", str(shards)) for a in extra]
    assert main(args) == EXIT_USER_ERROR
    assert message in _one_line_error(capsys)
    monkeypatch.setenv("NIT_TRACEBACK", "1")  # the traceback on demand
    with pytest.raises(error):
        main(args)


def test_a_genuine_failure_keeps_its_traceback(shards, tmp_path, monkeypatch):
    from nit_lightning.training.module import NiTModule

    def broken(self, batch, batch_idx):
        raise RuntimeError("a bug, not a user error")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(NiTModule, "training_step", broken)
    with pytest.raises(RuntimeError, match="a bug"):  # propagates: the interpreter prints it and exits 1
        main(fit_args(shards, max_steps=1))


def test_fit_on_an_empty_dataset_fails(tmp_path, monkeypatch, capsys):
    # used to log "`Trainer.fit` stopped: No training batches." and exit 0 without any checkpoint
    empty = write_latent_shards(tmp_path / "empty", num_samples=0)
    monkeypatch.chdir(tmp_path)
    assert main(fit_args(empty, max_steps=2)) == EXIT_USER_ERROR
    assert "fit trained nothing: the training data gave no packs (0 samples" in _one_line_error(capsys)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_evaluation_without_weights_refuses(command, shards, tmp_path, monkeypatch, capsys):
    # used to evaluate a randomly initialised model and exit 0
    monkeypatch.chdir(tmp_path)
    args = [command, *fit_args(shards)[1:], "--data.val_sources", json.dumps([{"path": str(shards)}])]
    assert main(args) == EXIT_USER_ERROR
    assert f"`{command}` needs --ckpt_path" in _one_line_error(capsys, command)


@pytest.mark.slow
def test_validate_without_val_sources_refuses_through_the_real_entry_point(shards, tmp_path):
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    fit = subprocess.run([sys.executable, "-m", "nit_lightning", *fit_args(shards, max_steps=1)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = next(tmp_path.rglob("last.ckpt"))
    validate = ["validate", *fit_args(shards)[1:], "--ckpt_path", str(ckpt)]
    # used to exit 0 having validated nothing (no --data.val_sources)
    result = subprocess.run([sys.executable, "-m", "nit_lightning", *validate], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_USER_ERROR and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "python -m nit_lightning validate: error: validate evaluated nothing: set --data.val_sources")


def test_fit_over_only_damaged_checkpoints_refuses_unless_told_to_start_anew(shards, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NIT_FRESH_START", raising=False)
    ckpt_dir = tmp_path / "outputs" / "debug" / "checkpoints"  # debug.yaml's ModelCheckpoint dirpath
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "last.ckpt").write_bytes(b"half a checkpoint")
    # used to print "auto-resume: no checkpoint in DIR, starting from scratch" and train from step 0, rc 0
    assert main(fit_args(shards, max_steps=1)) == EXIT_USER_ERROR
    assert "every checkpoint in" in (line := _one_line_error(capsys)) and "last.ckpt (" in line
    monkeypatch.setenv("NIT_FRESH_START", "1")
    assert main(fit_args(shards, max_steps=1)) == 0
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt", "last.ckpt.corrupt"]


def test_fit_over_a_damaged_last_ckpt_keeps_last_ckpt_the_newest_valid_state(shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "every2.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {dirpath: ckpt, every_n_train_steps: 2, save_last: true, save_top_k: -1}\n")
    assert main(fit_args(shards, max_steps=2) + ["--config", "every2.yaml"]) == 0
    last = tmp_path / "ckpt" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # a save cut short
    # used to resume from epoch=0-step=2.ckpt and write last-v1.ckpt beside the broken last.ckpt, which stayed
    assert main(fit_args(shards, max_steps=4) + ["--config", "every2.yaml"]) == 0
    assert sorted(p.name for p in last.parent.glob("last*")) == ["last.ckpt", "last.ckpt.corrupt"]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
