"""Two runs into one output folder, with real processes: the second stops at once naming the first (pid, command);
the first, paused meanwhile with SIGSTOP so that the two surely overlap, then finishes with intact outputs."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.fit import fit_args
from helpers.shards import write_latent_shards
from nit_lightning.records.lock import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]


def _start(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "nit_lightning", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _pause_when_locked(process: subprocess.Popen, lock: Path, timeout: float = 120.0) -> None:
    """Wait until `process` holds `lock`, then stop it (SIGSTOP): alive, holding the folder, doing nothing."""
    deadline = time.monotonic() + timeout
    while not lock.exists():
        if process.poll() is not None:
            pytest.fail(f"the first run ended before taking its lock:\n{process.stdout.read()}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the first run did not take its lock in time")
        time.sleep(0.05)
    process.send_signal(signal.SIGSTOP)


def _finish(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGCONT)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    return output


def _second(argv: list[str], cwd: Path, capfd) -> str:
    """The second run, in this process (no start-up delay): exit 2 and one error line."""
    from helpers.fit import run_command as main

    before = os.getcwd()
    os.chdir(cwd)
    try:
        assert main(argv) == 2
    finally:
        os.chdir(before)
    errors = [line for line in capfd.readouterr().err.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "Traceback" not in errors[0], errors
    return errors[0]


@pytest.mark.slow
def test_two_prepare_runs_into_one_folder(tmp_path, capfd):
    """Before: both exited 0 and the second run's index described a tar holding members of both runs."""
    from nit_lightning.data.shard_reader import ShardReader
    from nit_lightning.data.shards import load_index
    from nit_lightning.data.synthetic import SynthSettings, write_synthetic

    images, out = tmp_path / "images", tmp_path / "shards"
    write_synthetic(SynthSettings(out=str(images), num_images=60, num_classes=3, min_side=32, max_side=64))
    common = ["prepare", "--input", str(images), "--output", str(out), "--codec", "pixel:8", "--samples-per-shard",
              "400"]
    first = _start(common + ["--flip"], tmp_path)
    _pause_when_locked(first, out / LOCK_NAME)
    message = _second(common, tmp_path, capfd)
    assert f"is in use by prepare (pid {first.pid} on " in message and "wait for it to finish" in message
    _finish(first)
    index = load_index(out)
    samples = ShardReader().samples(out / "shard-000000.tar")
    assert index["num_samples"] == 60 == len(list(samples)) and index["flip"] is True
    assert not (out / LOCK_NAME).exists() and not list(out.glob("*.tmp"))


@pytest.mark.slow
def test_two_fit_runs_into_one_checkpoint_folder(tmp_path, capfd):
    """Before: both exited 0, leaving step=N.ckpt beside step=N-v1.ckpt and last.ckpt beside last-v1.ckpt."""
    shards = write_latent_shards(tmp_path / "shards", num_samples=12)
    run = tmp_path / "run"
    run.mkdir()
    ckpt_dir = run / "outputs" / "debug" / "checkpoints"
    first = _start(fit_args(shards, max_steps=3), run)
    _pause_when_locked(first, ckpt_dir / LOCK_NAME)
    message = _second(fit_args(shards, max_steps=3) + ["--data.seed", "1"], run, capfd)
    assert f"is in use by fit (pid {first.pid} on " in message
    _finish(first)
    names = sorted(p.name for p in ckpt_dir.iterdir())
    assert "last.ckpt" in names and not [n for n in names if "-v1" in n] and LOCK_NAME not in names, names
