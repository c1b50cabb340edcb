"""Errors a user can fix from the message alone are one line with exit 2, raised before the work where they can be
known then (issue 21 item 10): read-only outputs, an output path that is a folder, a damaged checkpoint, a network
config of another version, a pack that does not fit in memory, a YAML error, a damaged result file."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from helpers.fit import fit_args
from helpers.nets import random_debug_net, write_lightning_checkpoint
from helpers.shards import write_latent_shards

REPO = Path(__file__).resolve().parents[1]


def one_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"python -m nit_lightning {prog}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def read_only(tmp_path):
    """A folder nothing can be written into, even by root: a read-only tmpfs (needs mount rights), else chmod 555
    for a user who is not root; skipped where neither works."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_read_only_outputs_fail_before_any_work(read_only, tmp_path, monkeypatch, capsys):
    from helpers.fit import run_command as main
    from nit_lightning.data.synthetic import SynthSettings, write_synthetic

    images = tmp_path / "images"
    write_synthetic(SynthSettings(out=str(images), num_images=6, num_classes=2, min_side=32, max_side=48))
    assert main(["prepare", "--input", str(images), "--output", str(read_only / "shards"), "--codec", "pixel:8"]) == 2
    assert "cannot write in the output folder" in one_line(capsys, "prepare")
    ckpt = write_lightning_checkpoint(tmp_path / "a.ckpt", random_debug_net())
    assert main(["sample", "--ckpt", str(ckpt), "--sizes", "8x8", "--num-samples", "2", "--steps", "1", "--out",
                 str(read_only / "samples"), "--device", "cpu"]) == 2
    assert "cannot write in the output folder" in one_line(capsys, "sample")
    assert main(["reference", "build", "--images", str(images), "--size", "32x32", "--out",
                 str(read_only / "ref.npz"), "--features", "featurenet:/nowhere.pt"]) == 2
    assert "is not a writable folder" in one_line(capsys, "reference")  # before the (missing) extractor is read
    shards = write_latent_shards(tmp_path / "shards", num_samples=8)
    monkeypatch.chdir(read_only)  # fit's checkpoints (outputs/debug/checkpoints) land in a read-only folder
    assert main(fit_args(shards, max_steps=2)) == 2
    assert "cannot write in the output folder" in one_line(capsys, "fit")


def test_an_output_file_that_is_a_folder_fails_before_the_work(tmp_path, capsys):
    """Before: evaluate and reference build failed after all the work was done, and the result was lost."""
    from helpers.fit import run_command as main

    assert main(["evaluate", "--samples", str(tmp_path), "--ref", str(tmp_path / "r.npz"), "--out", str(tmp_path),
                 "--features", "featurenet:/nowhere.pt"]) == 2
    assert f"--out {tmp_path} is a folder" in one_line(capsys, "evaluate")
    assert main(["reference", "build", "--images", str(tmp_path), "--size", "32x32", "--out", str(tmp_path),
                 "--features", "featurenet:/nowhere.pt"]) == 2
    assert f"--out {tmp_path} is a folder" in one_line(capsys, "reference")


def test_validate_with_a_truncated_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    from helpers.fit import run_command as main

    shards = write_latent_shards(tmp_path / "shards", num_samples=8)
    ckpt = write_lightning_checkpoint(tmp_path / "a.ckpt", random_debug_net(num_classes=10))
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    monkeypatch.chdir(tmp_path)
    argv = fit_args(shards, max_steps=2) + ["--data.val_sources", f'[{{"path": "{shards}"}}]', "--ckpt_path",
                                            str(ckpt)]
    assert main(["validate", *argv[1:]]) == 2
    assert f"checkpoint {ckpt} does not load" in one_line(capsys, "validate")


def test_a_checkpoint_with_an_unknown_network_key_is_one_line(tmp_path, capsys):
    from helpers.fit import run_command as main

    ckpt = write_lightning_checkpoint(tmp_path / "a.ckpt", random_debug_net())
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["nit_meta"]["net_config"]["wings"] = 2  # a network option of another version
    torch.save(checkpoint, ckpt)
    assert main(["sample", "--ckpt", str(ckpt), "--sizes", "8x8", "--out", str(tmp_path / "s"), "--device",
                 "cpu"]) == 2
    assert "keys this code does not know: ['wings']" in one_line(capsys, "sample")


def test_a_yaml_error_in_a_sweep_file_is_one_line_naming_the_place(tmp_path, capsys):
    from helpers.fit import run_command as main

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("settings:\n  - {size: 8x8, steps: 2\n")
    ckpt = write_lightning_checkpoint(tmp_path / "a.ckpt", random_debug_net())
    assert main(["sample", "--ckpt", str(ckpt), "--sweep", str(sweep), "--out", str(tmp_path / "s")]) == 2
    assert f"sweep file '{sweep}' is not valid YAML at line 3" in one_line(capsys, "sample")


MEMORY_CAPPED = textwrap.dedent("""
    import resource, sys
    cap = int(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    from nit_lightning.__main__ import main
    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
def test_a_size_that_does_not_fit_in_memory_says_which_budget_to_lower(tmp_path):
    """Under a memory cap, a huge size used to end in a traceback from the allocator."""
    ckpt = write_lightning_checkpoint(tmp_path / "a.ckpt", random_debug_net())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = ["sample", "--ckpt", str(ckpt), "--sizes", "2048x2048,8x8", "--num-samples", "2", "--steps", "1", "--out",
            str(tmp_path / "s"), "--device", "cpu", "--tokens-per-forward", str(4 * 1024 * 1024)]
    done = subprocess.run([sys.executable, "-c", MEMORY_CAPPED, str(6 * 2**30), *argv], env=env, capture_output=True,
                          text=True, timeout=600)
    errors = [line for line in done.stderr.splitlines() if ": error:" in line]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "out of memory on cpu sampling a pack" in errors[0] and "lower --tokens-per-forward" in errors[0]


def test_a_damaged_result_of_a_finished_setting_is_said_and_done_again(tmp_path, caplog):
    """A truncated result.json used to stop the sweep with "Unterminated string ..." and no file name."""
    from nit_lightning.evaluation.sweep import _finished

    damaged = tmp_path / "256x256" / "result.json"
    damaged.parent.mkdir()
    damaged.write_text('{"status": "ok", "config": {"num')
    with caplog.at_level("WARNING"), contextlib.suppress(Exception):
        assert _finished(damaged) is None
    assert f"sweep result '{damaged}' is damaged" in caplog.text and "evaluated again" in caplog.text
