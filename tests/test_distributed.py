"""distributed.py: one answer to "which rank, which device" from torchrun's or srun's environment."""
from __future__ import annotations

import pytest
import torch

from nit_lightning import distributed

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


@pytest.fixture()
def clean_env(monkeypatch):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_single_process_without_a_launcher(clean_env):
    assert distributed.from_environment() == distributed.Ranks(0, 1, 0)
    assert distributed.current().is_main


def test_torchrun_wins_over_srun(clean_env):
    clean_env.setenv("SLURM_PROCID", "3")
    clean_env.setenv("SLURM_NTASKS", "4")
    clean_env.setenv("SLURM_LOCALID", "3")
    assert distributed.from_environment() == distributed.Ranks(3, 4, 3)
    clean_env.setenv("RANK", "1")
    clean_env.setenv("WORLD_SIZE", "2")
    clean_env.setenv("LOCAL_RANK", "1")
    assert distributed.from_environment() == distributed.Ranks(1, 2, 1)


def test_a_rank_outside_the_world_is_refused(clean_env):
    clean_env.setenv("RANK", "2")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world size 2\)"):
        distributed.from_environment()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_devices_for_a_rank_without_cuda():
    assert distributed.device_for("auto", 3) == torch.device("cpu")
    assert distributed.device_for("cpu", 3) == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        distributed.device_for("cuda", 1)


def test_no_process_group_for_one_rank():
    with distributed.process_group(distributed.Ranks(), torch.device("cpu")):
        distributed.barrier()  # a no-op without a group
    assert not torch.distributed.is_initialized()
