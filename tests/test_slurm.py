"""SLURM scripts (syntax, shellcheck, dry runs with fake srun/python), Lightning's SLURM environment, FSDP strategies."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch"))


def test_scripts_exist():
    assert {p.name for p in SCRIPTS} >= {"train_xl.sbatch", "train_b_ablation.sbatch", "sample_eval.sbatch"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax_and_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not on PATH (apt-get install -y shellcheck); bash -n passed")
    result = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_sbatch_headers():
    text = (REPO / "slurm" / "train_xl.sbatch").read_text()
    for line in ("--ntasks-per-node=8", "--gpus-per-node=8", "--signal=SIGUSR1@120", "--requeue",
                 "--output=slurm/logs/%x-%j.out", "--cpus-per-task=", "--time=", "--nodes="):
        assert f"#SBATCH {line}" in text, line
    assert "#SBATCH --array=0-2" in (REPO / "slurm" / "train_b_ablation.sbatch").read_text()


def _fake_bin(tmp_path: Path) -> tuple[Path, Path]:
    """srun / scontrol / python stand-ins that record their arguments and environment in calls.log."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir(parents=True)
    scripts = {
        # srun: run the command once as task 3 of 16 (what one of srun's tasks would see)
        "srun": f'#!/bin/bash\necho "srun $*" >> {log}\nwhile [[ "$1" == --* ]]; do shift; done\n'
                'SLURM_PROCID=3 SLURM_NTASKS=16 SLURM_LOCALID=3 exec "$@"\n',
        "scontrol": '#!/bin/bash\n[[ "$1 $2" == "show hostnames" ]] && printf "gpu003\\ngpu004\\n"\n',
        # python: record `-m nit_lightning ...`, run anything else (the YAML reader) with the real interpreter
        "python": f'#!/bin/bash\nif [[ "$1" == "-m" ]]; then\n'
                  f'  echo "python $* | RANK=$RANK WORLD_SIZE=$WORLD_SIZE LOCAL_RANK=$LOCAL_RANK '
                  f'MASTER=$MASTER_ADDR:$MASTER_PORT NIT_CKPT_DIR=$NIT_CKPT_DIR" >> {log}\n'
                  f'  exit 0\nfi\nexec {sys.executable} "$@"\n',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir, log


def _dry_run(tmp_path: Path, script: str, **env: str) -> tuple[int, str, str]:
    bin_dir, log = _fake_bin(tmp_path)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update(PATH=f"{bin_dir}:{os.environ['PATH']}", VENV_ACTIVATE="", REPO_DIR=str(REPO), **env)
    result = subprocess.run(["bash", str(REPO / "slurm" / script)], env=base, capture_output=True, text=True)
    return result.returncode, log.read_text() if log.exists() else "", result.stderr


def test_train_xl_command_line(tmp_path):
    code, calls, err = _dry_run(tmp_path, "train_xl.sbatch", SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="8",
                                SLURM_JOB_ID="77", DATA_DIR="/data/lat", CKPT_DIR="/ckpt/xl",
                                EXTRA_ARGS="--trainer.max_steps=5 --seed_everything=1")
    assert code == 0, err
    assert ("srun --kill-on-bad-exit=1 --nodes=2 --ntasks=16 --ntasks-per-node=8 python -m nit_lightning fit --config "
            "experiments/nit_xl.yaml") in calls
    for part in ("--trainer.num_nodes=2", "--trainer.devices=8", "path: /data/lat/native", "path: /data/lat/fixed512",
                 "--trainer.max_steps=5 --seed_everything=1", "NIT_CKPT_DIR=/ckpt/xl"):
        assert part in calls, part


@pytest.mark.parametrize("script", ["train_xl.sbatch", "train_b_ablation.sbatch"])
def test_requeue_callback_comes_from_the_configs_not_the_scripts(script):
    """The configs carry RequeueOnSignal (a plain `fit` saves on a signal too); a script adding it again would give two,
    which the CLI refuses (fault_tolerance.ensure_requeue_on_signal)."""
    import yaml

    text = (REPO / "slurm" / script).read_text()
    assert "RequeueOnSignal" not in text.split("srun", 1)[1]
    configs = {"train_xl.sbatch": ["nit_xl"], "train_b_ablation.sbatch": ["nit_b_ablation_native", "nit_b_ablation_mix",
                                                                          "nit_b_ablation_fixed"]}[script]
    for name in configs:
        callbacks = yaml.safe_load((REPO / "experiments" / f"{name}.yaml").read_text())["trainer"]["callbacks"]
        paths = [c["class_path"] for c in callbacks]
        assert paths.count("nit_lightning.training.fault_tolerance.RequeueOnSignal") == 1, name


def test_ablation_array_picks_variant(tmp_path):
    code, calls, err = _dry_run(tmp_path, "train_b_ablation.sbatch", SLURM_ARRAY_TASK_ID="1", SLURM_NNODES="1",
                                SLURM_NTASKS_PER_NODE="2", OUT_DIR="/runs")
    assert code == 0, err
    assert "--config experiments/nit_b_ablation_mix.yaml" in calls and "--trainer.devices=2" in calls
    assert "NIT_CKPT_DIR=/runs/nit_b_ablation_mix/checkpoints" in calls
    code, _, err = _dry_run(tmp_path / "bad", "train_b_ablation.sbatch", SLURM_ARRAY_TASK_ID="3")
    assert code == 2 and "no variant" in err
    for variant in ("native", "mix", "fixed"):
        assert (REPO / "experiments" / f"nit_b_ablation_{variant}.yaml").exists()


def test_sample_eval_array_mode(tmp_path):
    code, calls, err = _dry_run(tmp_path, "sample_eval.sbatch", SLURM_ARRAY_TASK_ID="2", CKPT="/c/last.ckpt", NUM="100")
    assert code == 0, err
    assert ("python -m nit_lightning sweep --sweep experiments/sweeps/resolution.yaml --ckpt /c/last.ckpt "
            "--ref-dir references --num-samples 100 --out outputs/sweeps/resolution --sizes 768x768") in calls
    code, _, err = _dry_run(tmp_path / "bad", "sample_eval.sbatch", SLURM_ARRAY_TASK_ID="6")
    assert code == 2 and "has 6 settings" in err


def test_sample_eval_sharded_mode(tmp_path):
    code, calls, err = _dry_run(tmp_path, "sample_eval.sbatch", MODE="sharded", SLURM_JOB_ID="123456",
                                SLURM_JOB_NODELIST="gpu[003-004]", SWEEP="experiments/sweeps/aspect_ratio.yaml",
                                EXTRA_ARGS="--features featurenet:/f.pt")
    assert code == 0, err
    assert "--sizes 320x960,416x768,480x640,640x480,768x416,960x320 --features featurenet:/f.pt" in calls
    assert "RANK=3 WORLD_SIZE=16 LOCAL_RANK=3 MASTER=gpu003:18456" in calls  # 15000 + 123456 % 10000
    # the header's --array=0-5 left in place: six jobs would write one OUT; refused before any work
    code, calls, err = _dry_run(tmp_path / "array", "sample_eval.sbatch", MODE="sharded", SLURM_ARRAY_TASK_COUNT="6",
                                SLURM_JOB_ID="1", SLURM_JOB_NODELIST="gpu003")
    assert code == 2 and "submit it with --array=0" in err and "nit_lightning sweep" not in calls


# ---- Lightning's SLURM environment with our Trainer settings ------------------------------------------------------
SLURM_ENV = {"SLURM_NTASKS": "16", "SLURM_NTASKS_PER_NODE": "8", "SLURM_PROCID": "11", "SLURM_LOCALID": "3",
             "SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "123456",
             "SLURM_JOB_NAME": "nit-xl"}


@pytest.fixture
def slurm_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("SLURM_", "MASTER_", "LOCAL_RANK", "WORLD_SIZE", "RANK")):
            monkeypatch.delenv(name)
    for name, value in SLURM_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # SLURMEnvironment writes these into os.environ: undo it after
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)


def test_slurm_environment_ranks_and_world(slurm_env):
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch import Trainer

    from nit_lightning.training.fault_tolerance import RequeueOnSignal

    trainer = Trainer(accelerator="cpu", devices=8, num_nodes=2, strategy="ddp", logger=False)
    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment)
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (16, 11, 3, 1)
    assert trainer.num_nodes == 2 and trainer.num_devices == 8
    assert environment.main_address == "gpu003" and environment.main_port == 15000 + 3456
    assert environment.auto_requeue  # Lightning's own handler would be on ...
    RequeueOnSignal().setup(trainer, None, "fit")
    assert not environment.auto_requeue  # ... until our callback takes over


def test_slurm_node_count_mismatch_is_an_error(slurm_env):
    from lightning.pytorch import Trainer

    from nit_lightning.training.fault_tolerance import RequeueOnSignal

    # Lightning validates this only for processes it launches itself, not under srun: our callback does it.
    trainer = Trainer(accelerator="cpu", devices=8, num_nodes=1, strategy="ddp", logger=False)
    assert trainer.world_size == 16  # from SLURM_NTASKS, while the strategy would plan for 1 x 8
    with pytest.raises(ValueError, match="num_nodes=1"):  # why the scripts pass --trainer.num_nodes=$SLURM_NNODES
        RequeueOnSignal().setup(trainer, None, "fit")


def test_more_slurm_tasks_than_the_trainer_expects_is_an_error(slurm_env, monkeypatch):
    """A job requeued onto one node keeps SLURM_NTASKS=2: srun started two tasks there, each a one-device trainer of
    its own (both rank 0, one checkpoint folder). Seen on the real cluster; refused before training."""
    from lightning.pytorch import Trainer

    from nit_lightning.training.fault_tolerance import RequeueOnSignal

    for name, value in {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_NNODES": "1",
                        "SLURM_NODELIST": "n1", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(name, value)
    trainer = Trainer(accelerator="cpu", devices=1, num_nodes=1, logger=False)
    with pytest.raises(ValueError, match="SLURM started 2 tasks .* expects num_nodes × devices = 1 × 1"):
        RequeueOnSignal().setup(trainer, None, "fit")


# ---- FSDP strategies -------------------------------------------------------------------------------------------
def test_strategy_bad_arguments():
    from nit_lightning.training.strategies import NiTFSDP2Strategy, resolve_dtype

    with pytest.raises(ValueError, match="nit_lightning.models.nit.NoSuchBlock"):
        NiTFSDP2Strategy(block_class="nit_lightning.models.nit.NoSuchBlock")
    with pytest.raises(ValueError, match="not an nn.Module"):
        NiTFSDP2Strategy(block_class="nit_lightning.models.nit.build_nit")
    with pytest.raises(ValueError, match="'int8'"):
        resolve_dtype("int8")


class _TinyNiTModule:  # built lazily: Lightning import inside the test keeps collection fast
    @staticmethod
    def make():
        from lightning.pytorch import LightningModule
        from torch.utils.data import DataLoader

        from nit_lightning.models.nit import build_nit

        class Module(LightningModule):
            def __init__(self):
                super().__init__()
                self.net = build_nit("NiT-debug", in_channels=4, num_classes=10)
                self.head = torch.nn.Linear(4, 4)  # a trainable module outside the net: must be sharded too

            def configure_model(self):
                pass

            def training_step(self, batch, batch_idx):
                generator = torch.Generator().manual_seed(self.global_step)
                hw = torch.tensor([[2, 3], [4, 4]])
                x = torch.randn(22, 4, generator=generator)
                t, y = torch.rand(2, generator=generator), torch.tensor([1, 2])
                return (self.head(self.net(x, t, y, hw)) - x).pow(2).mean()

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-2)

            def train_dataloader(self):
                return DataLoader(range(100), batch_size=1)

        return Module()


def _fit_tiny(root: Path, strategy, ema) -> dict:
    from lightning.pytorch import Trainer

    torch.manual_seed(0)
    module = _TinyNiTModule.make()
    from nit_lightning.training.callbacks import GradNormMonitor

    # GradNormMonitor: its norm is a DTensor under FSDP2 (full_tensor, no host sync)
    trainer = Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=3, logger=False,
                      callbacks=[ema, GradNormMonitor()],
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=root)
    trainer.fit(module)
    trainer.save_checkpoint(root / "final.ckpt")
    return torch.load(root / "final.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_fsdp2_per_block_and_sharded_ema_match_single_device(tmp_path):
    from nit_lightning.training.ema import EMA
    from nit_lightning.training.strategies import NiTFSDP2Strategy, ShardedEMA

    strategy = NiTFSDP2Strategy(param_dtype="float32")
    sharded = _fit_tiny(tmp_path / "fsdp2", strategy, ShardedEMA(decay=0.5))
    plain = _fit_tiny(tmp_path / "plain", "auto", EMA(decay=0.5))
    assert strategy.num_groups == 2 + 1 + 1  # 2 blocks, the net's root, the extra head
    assert sharded["ema_state_dict"].keys() == plain["ema_state_dict"].keys()
    for key, value in plain["ema_state_dict"].items():
        assert type(sharded["ema_state_dict"][key]) is torch.Tensor  # gathered, not a DTensor
        assert torch.equal(sharded["ema_state_dict"][key], value), key
    for key, value in plain["state_dict"].items():
        assert torch.equal(sharded["state_dict"][key], value), key


_FSDP2_SCRIPT = '''
import sys
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader
from nit_lightning.models.nit import build_nit
from nit_lightning.training.ema import EMA
from nit_lightning.training.strategies import NiTFSDP2Strategy, ShardedEMA


class Module(LightningModule):
    def __init__(self):
        super().__init__()
        self.net = build_nit("NiT-debug", in_channels=4, num_classes=10)

    def configure_model(self):
        pass

    def training_step(self, batch, batch_idx):
        generator = torch.Generator().manual_seed(self.global_step)  # the same batch on every rank
        hw = torch.tensor([[2, 3], [4, 4]])
        x = torch.randn(22, 4, generator=generator)
        t, y = torch.rand(2, generator=generator), torch.tensor([1, 2])
        return (self.net(x, t, y, hw) - x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return DataLoader(range(100), batch_size=1)


mode, out, steps, ckpt = sys.argv[1], sys.argv[2], int(sys.argv[3]), (sys.argv[4] if len(sys.argv) > 4 else None)
torch.manual_seed(0)
ema = ShardedEMA(decay=0.5) if mode == "fsdp2" else EMA(decay=0.5)
strategy = NiTFSDP2Strategy(param_dtype="float32") if mode == "fsdp2" else "auto"
trainer = Trainer(accelerator="cpu", devices=2 if mode == "fsdp2" else 1, strategy=strategy, max_steps=steps,
                  logger=False, callbacks=[ema], enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False)
module = Module()
trainer.fit(module, ckpt_path=ckpt)
if mode == "fsdp2":
    from torch.distributed.tensor import DTensor
    shard = ema.shadow["blocks.0.mlp.fc1.weight"]
    assert isinstance(shard, DTensor) and shard.to_local().shape[0] * 2 == shard.shape[0], shard.to_local().shape
trainer.save_checkpoint(out)
'''


@pytest.mark.slow
def test_fsdp2_two_ranks_shards_ema_and_resumes_exactly(tmp_path):
    script = tmp_path / "fsdp2_run.py"
    script.write_text(_FSDP2_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "LOCAL_RANK", "WORLD"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # load-independent rounding

    def run(*args: str) -> None:
        result = subprocess.run([sys.executable, str(script), *args], env=env, cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]

    run("fsdp2", str(tmp_path / "half.ckpt"), "3")  # 2 ranks, 3 steps, EMA gathered into the checkpoint
    run("fsdp2", str(tmp_path / "resumed.ckpt"), "5", str(tmp_path / "half.ckpt"))  # resume: EMA re-sharded
    run("fsdp2", str(tmp_path / "straight.ckpt"), "5")
    run("plain", str(tmp_path / "plain.ckpt"), "5")
    load = lambda name: torch.load(tmp_path / name, map_location="cpu", weights_only=True)  # noqa: E731
    resumed, straight, plain = load("resumed.ckpt"), load("straight.ckpt"), load("plain.ckpt")
    assert resumed["global_step"] == straight["global_step"] == plain["global_step"] == 5
    for part in ("state_dict", "ema_state_dict"):
        assert resumed[part].keys() == straight[part].keys() == plain[part].keys()
        for key, value in straight[part].items():
            assert torch.equal(resumed[part][key], value), f"{part} {key}: resume is not exact"
            # 2 ranks vs 1 device: same maths, different reduction rounding (~3e-7 after 3 steps, AdamW amplifies
            # it where the zero-initialised adaLN weights see tiny gradients: ~1e-4 after 5 steps at lr 1e-2)
            torch.testing.assert_close(value, plain[part][key], atol=1e-3, rtol=0, msg=f"{part} {key}")
