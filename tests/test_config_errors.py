"""Config mistakes of the Lightning commands (issue 22, item 4): no prefix matching of keys, an unknown key is one line
naming the nearest valid key, a missing --config and a GPU config on a CPU machine say what to do."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from helpers.fit import DEBUG_CONFIG, REPO
from nit_lightning.cli.config_errors import explain, nearest
from nit_lightning.cli.lightning import main


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "warn" not in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("python -m nit_lightning fit: error: "), err
    assert "usage:" not in err and "Traceback" not in err, err
    return lines[0]


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    return _one_line(capsys)


def test_an_abbreviated_key_is_refused_naming_the_full_one(capsys):
    """`--trainer.max_step 10` used to be taken as max_steps (argparse prefix matching)."""
    line = _fails(["fit", "--config", str(DEBUG_CONFIG), "--trainer.max_step", "10", "--print_config"], capsys)
    assert "unknown key --trainer.max_step (did you mean --trainer.max_steps?)" in line


def test_an_unknown_key_is_one_line_with_the_nearest_valid_key(capsys, tmp_path):
    """`--model.lrr 1e-3` used to print 84 lines of usage and no suggestion."""
    line = _fails(["fit", "--config", str(DEBUG_CONFIG), "--model.lrr", "1e-3", "--print_config"], capsys)
    assert "unknown key --model.lrr (did you mean --model.lr?)" in line
    config = tmp_path / "typo.yaml"
    config.write_text("trainer:\n  max_step: 3\n")
    line = _fails(["fit", "--config", str(DEBUG_CONFIG), "--config", str(config), "--print_config"], capsys)
    assert "unknown key trainer.max_step in the config (did you mean trainer.max_steps?)" in line
    line = _fails(["fit", "--config", str(DEBUG_CONFIG), "--model.lr", "fast", "--print_config"], capsys)
    assert 'Parser key "model.lr"' in line and "fast" in line  # jsonargparse's message, on one line


def test_fit_without_a_config_says_to_pass_one(capsys):
    line = _fails(["fit"], capsys)
    assert "fit.model.net" in line and "no --config was given; pass --config experiments/<name>.yaml" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_a_gpu_config_on_a_cpu_machine_says_what_to_do(capsys, monkeypatch):
    """It used to end in Lightning's `No supported gpu backend found!` with no hint."""
    monkeypatch.delenv("NIT_TRACEBACK", raising=False)
    assert main(["fit", "--config", str(REPO / "experiments" / "nit_b_ablation_native.yaml")]) == 2
    line = _one_line(capsys)
    assert "trainer.accelerator=gpu but this machine has no CUDA GPU: add --trainer.accelerator cpu" in line
    assert "experiments/debug.yaml" in line


def test_nearest_keys_prefer_the_same_section():
    known = ["--model.lr", "--model.lr_schedule", "--data.seed", "--model.seed", "--trainer.max_steps"]
    assert nearest("--model.sed", known) == "--model.seed" and nearest("--zzz", known) is None
    assert explain("unrecognized arguments: --zzz 1", known) .startswith("unknown key --zzz;")


@pytest.mark.slow
def test_the_real_entry_point_prints_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "nit_lightning", "fit", "--config", str(DEBUG_CONFIG),
                          "--trainer.max_step", "10", "--print_config"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and run.stdout == ""
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert errors == ["python -m nit_lightning fit: error: unknown key --trainer.max_step (did you mean "
                      "--trainer.max_steps?); keys are never abbreviated (--help lists them)"], run.stderr
