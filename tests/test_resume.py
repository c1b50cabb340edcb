"""Exact resume on CPU: 2k steps straight == k steps + resume from `last` + k steps, bitwise (params, EMA, losses, data)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from helpers.fit import fit_args
from helpers.shards import write_latent_shards

# A second --config replaces the debug config's callbacks: EMA plus a checkpoint after every step (and `last`).
CALLBACKS_YAML = """
trainer:
  callbacks:
    - class_path: nit_lightning.training.ema.EMA
      init_args: {decay: 0.9}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: ckpts, every_n_train_steps: 1, save_last: true, save_top_k: -1}
"""


class Recorder(Callback):
    """Per optimiser step: the loss and the keys of the pack it came from."""

    def __init__(self) -> None:
        self.steps: dict[int, tuple[float, list[str]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step] = (float(outputs["loss"]), list(batch.keys))


def run(workdir: Path, shards: Path, max_steps: int, monkeypatch, extra: list[str] = ()) -> Recorder:
    from nit_lightning.cli.lightning import run_cli

    workdir.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(workdir)
    (workdir / "callbacks.yaml").write_text(CALLBACKS_YAML)
    recorder = Recorder()
    args = fit_args(shards, max_steps=max_steps, tokens=64) + ["--config", "callbacks.yaml", *extra]
    cli = run_cli(args, trainer_defaults={"callbacks": [recorder]})
    assert cli.trainer.global_step == max_steps
    return recorder


@pytest.mark.slow
def test_resume_is_bitwise_exact(tmp_path, monkeypatch):
    shards = write_latent_shards(tmp_path / "shards", num_samples=24)
    k = 5  # 24 samples of ~16 tokens in packs of 64: ~7 packs per epoch, so step k is mid-epoch and 2k crosses one
    straight = run(tmp_path / "straight", shards, 2 * k, monkeypatch)
    first = run(tmp_path / "resumed", shards, k, monkeypatch)
    second = run(tmp_path / "resumed", shards, 2 * k, monkeypatch, ["--ckpt_path", "last"])
    assert sorted(first.steps) == list(range(1, k + 1)) and sorted(second.steps) == list(range(k + 1, 2 * k + 1))
    for step in range(1, 2 * k + 1):
        assert (first.steps | second.steps)[step] == straight.steps[step], f"step {step} differs"
    a = torch.load(tmp_path / "straight/ckpts/last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "resumed/ckpts/last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 2 * k
    assert a["epoch"] >= 1, "the run should cross an epoch boundary"
    for name in ("state_dict", "ema_state_dict"):
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), f"{name}[{key}] differs"
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for index in state_a:
        for field in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state_a[index][field], state_b[index][field])
