"""DDP on CPU (gloo, 2 processes through the CLI): same step count, different packs per rank, identical parameters."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

REPO = Path(__file__).resolve().parents[1]


class RankDump(Callback):
    """At the end of fit, each rank saves its step count and parameters to `<dirpath>/rank<r>.pt`."""

    def __init__(self, dirpath: str = "rank_dumps"):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module):
        self.dirpath.mkdir(parents=True, exist_ok=True)
        params = {k: v.detach().cpu().clone() for k, v in pl_module.net.state_dict().items()}
        torch.save({"global_step": trainer.global_step, "params": params}, self.dirpath / f"rank{trainer.global_rank}.pt")


CALLBACKS_YAML = """
trainer:
  callbacks:
    - class_path: nit_lightning.training.ema.EMA
      init_args: {decay: 0.9}
    - class_path: nit_lightning.training.callbacks.PackLog
      init_args: {dirpath: packs}
    - class_path: test_ddp.RankDump
      init_args: {dirpath: dumps}
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    from helpers.fit import fit_args
    from helpers.shards import write_latent_shards

    shards = write_latent_shards(tmp_path / "shards", num_samples=24)
    (tmp_path / "callbacks.yaml").write_text(CALLBACKS_YAML)
    steps = 3
    args = fit_args(shards, max_steps=steps, tokens=64)
    args[args.index("--trainer.devices") + 1] = "2"
    args[args.index("--trainer.strategy") + 1] = "ddp"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "nit_lightning", *args, "--config", "callbacks.yaml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    dumps = [torch.load(tmp_path / f"dumps/rank{r}.pt") for r in range(2)]
    assert dumps[0]["global_step"] == dumps[1]["global_step"] == steps
    for name, value in dumps[0]["params"].items():
        assert torch.equal(value, dumps[1]["params"][name]), f"{name} differs between ranks"
    packs = [[json.loads(line) for line in (tmp_path / f"packs/packs_rank{r}.jsonl").read_text().splitlines()]
             for r in range(2)]
    assert len(packs[0]) == len(packs[1]) == steps
    keys = [{k for record in rank for k in record["keys"]} for rank in packs]
    assert keys[0] and keys[1] and not keys[0] & keys[1], "ranks must read different samples within an epoch"
