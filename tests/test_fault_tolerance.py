"""Fault tolerance: newest-valid checkpoint selection, corrupt-file fallback, stop + requeue on a signal, exact resume."""
from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from helpers.shards import write_latent_shards
from nit_lightning.training.auto_resume import AdoptLastCheckpoint, apply_auto_resume
from nit_lightning.training.checkpoints import CorruptCheckpointError, find_resume_checkpoint
from nit_lightning.training.fault_tolerance import EXIT_OK, EXIT_REQUEUE, RequeueExit, RequeueOnSignal, slurm_job_id


def _fake_ckpt(path: Path, step: int, *, size: int = 2000, **drop: bool) -> Path:
    checkpoint = {"state_dict": {"w": torch.full((size,), float(step))}, "global_step": step, "loops": {"fit_loop": {}}}
    for key in drop:
        checkpoint.pop(key)
    torch.save(checkpoint, path)
    return path


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_newest_by_recorded_step_not_name_or_mtime(tmp_path):
    _fake_ckpt(tmp_path / "step=000200.ckpt", 200)
    _fake_ckpt(tmp_path / "step=000100.ckpt", 100)
    _fake_ckpt(tmp_path / "hpc_ckpt_1.ckpt", 300)  # Lightning's SLURM save, newer than all
    _fake_ckpt(tmp_path / "last.ckpt", 250)
    os.utime(tmp_path / "step=000100.ckpt", (2e9, 2e9))  # newest mtime must not matter
    assert find_resume_checkpoint(tmp_path) == str(tmp_path / "hpc_ckpt_1.ckpt")
    (tmp_path / "hpc_ckpt_1.ckpt").unlink()
    assert find_resume_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")


def test_tie_prefers_last(tmp_path):
    _fake_ckpt(tmp_path / "step=000200.ckpt", 200)
    _fake_ckpt(tmp_path / "last.ckpt", 200)
    assert find_resume_checkpoint(tmp_path) == str(tmp_path / "last.ckpt")


def test_truncated_last_falls_back_with_warning(tmp_path, caplog):
    _fake_ckpt(tmp_path / "step=000100.ckpt", 100)
    _truncate(_fake_ckpt(tmp_path / "last.ckpt", 150))
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(tmp_path) == str(tmp_path / "step=000100.ckpt")
    assert "last.ckpt" in caplog.text and "does not load" in caplog.text


def test_flipped_byte_fails_crc_and_falls_back(tmp_path, caplog):
    _fake_ckpt(tmp_path / "step=000100.ckpt", 100)
    last = _fake_ckpt(tmp_path / "last.ckpt", 150, size=20000)
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor record: torch.load would not notice
    last.write_bytes(bytes(data))
    assert torch.load(last, weights_only=True)["global_step"] == 150
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(tmp_path) == str(tmp_path / "step=000100.ckpt")
    assert "CRC" in caplog.text


def test_missing_keys_and_garbage_are_skipped(tmp_path, caplog):
    _fake_ckpt(tmp_path / "step=000100.ckpt", 100)
    _fake_ckpt(tmp_path / "step=000300.ckpt", 300, loops=True)  # a weights-only save cannot resume training
    (tmp_path / "last.ckpt").write_bytes(b"not a checkpoint")
    (tmp_path / "last.ckpt.tmp").write_bytes(b"half a save")  # never a candidate
    with caplog.at_level(logging.WARNING):
        assert find_resume_checkpoint(tmp_path) == str(tmp_path / "step=000100.ckpt")
    assert "['loops']" in caplog.text and "last.ckpt" in caplog.text


def test_nothing_to_resume(tmp_path):
    assert find_resume_checkpoint(tmp_path / "missing") is None
    assert find_resume_checkpoint(tmp_path) is None
    _truncate(_fake_ckpt(tmp_path / "last.ckpt", 5))
    assert find_resume_checkpoint(tmp_path) is None


def test_extra_dirs_find_hpc_checkpoints(tmp_path):
    ckpt_dir, root = tmp_path / "ckpt", tmp_path / "root"
    ckpt_dir.mkdir(), root.mkdir()
    _fake_ckpt(ckpt_dir / "last.ckpt", 10)
    _fake_ckpt(root / "hpc_ckpt_2.ckpt", 12)
    assert find_resume_checkpoint(ckpt_dir, extra_dirs=[root]) == str(root / "hpc_ckpt_2.ckpt")


def test_apply_auto_resume(tmp_path):
    explicit = _fake_ckpt(tmp_path / "explicit.ckpt", 1)
    ckpt_dir = tmp_path / "ckpt"
    assert apply_auto_resume(None, ckpt_dir) is None  # fresh start
    assert apply_auto_resume(str(explicit), ckpt_dir) == str(explicit)  # explicit path wins
    with pytest.raises(FileNotFoundError, match="no valid checkpoint"):
        apply_auto_resume("last", ckpt_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        apply_auto_resume(str(tmp_path / "nope.ckpt"), ckpt_dir)
    ckpt_dir.mkdir()
    _fake_ckpt(ckpt_dir / "step=000004.ckpt", 4)
    _truncate(_fake_ckpt(ckpt_dir / "last.ckpt", 6))
    assert apply_auto_resume(None, ckpt_dir) == str(ckpt_dir / "step=000004.ckpt")
    assert apply_auto_resume("last", ckpt_dir) == str(ckpt_dir / "step=000004.ckpt")
    assert apply_auto_resume(str(explicit), ckpt_dir) == str(explicit)


def test_every_checkpoint_damaged_fails_loudly_naming_them(tmp_path):
    _truncate(_fake_ckpt(tmp_path / "last.ckpt", 6))
    (tmp_path / "step=000004.ckpt").write_bytes(b"garbage")
    before = sorted(p.name for p in tmp_path.iterdir())
    # used to log "no checkpoint in DIR, starting from scratch" and train from step 0 with rc 0
    with pytest.raises(CorruptCheckpointError, match=r"every checkpoint .* damaged: last.ckpt \(does not load.*"
                                                     r"step=000004.ckpt .*NIT_FRESH_START=1"):
        apply_auto_resume(None, tmp_path, repair=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # refused: nothing touched
    with pytest.raises(FileNotFoundError, match="damaged: last.ckpt"):
        apply_auto_resume("last", tmp_path)


def test_fresh_start_over_damaged_checkpoints_is_explicit_and_moves_them_aside(tmp_path):
    _truncate(_fake_ckpt(tmp_path / "last.ckpt", 6))
    (tmp_path / "step=000004.ckpt").write_bytes(b"garbage")
    assert apply_auto_resume(None, tmp_path, fresh_start=True, repair=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt.corrupt", "step=000004.ckpt.corrupt"]
    assert apply_auto_resume(None, tmp_path) is None  # an empty directory is still a plain fresh start


def test_damaged_or_stale_last_is_replaced_by_the_newest_valid_checkpoint(tmp_path):
    step4 = _fake_ckpt(tmp_path / "step=000004.ckpt", 4)
    _truncate(_fake_ckpt(tmp_path / "last.ckpt", 6))
    assert apply_auto_resume(None, tmp_path, repair=True) == str(step4)
    last = tmp_path / "last.ckpt"
    assert last.read_bytes() == step4.read_bytes()  # last.ckpt is the newest valid state again, at once
    assert (tmp_path / "last.ckpt.corrupt").exists() and not (tmp_path / "last.ckpt.tmp").exists()
    assert apply_auto_resume(None, tmp_path, repair=True) == str(last)  # tie on step 4: last.ckpt, nothing to do

    root = tmp_path / "root"
    root.mkdir()
    hpc = _fake_ckpt(root / "hpc_ckpt_1.ckpt", 9)  # valid but newer than last.ckpt
    assert apply_auto_resume(None, tmp_path, extra_dirs=[root], repair=True) == str(hpc)
    assert torch.load(last, weights_only=True)["global_step"] == 9
    assert apply_auto_resume(None, tmp_path, extra_dirs=[root]) == str(last)


def test_a_refused_checkpoint_leaves_the_directory_untouched(tmp_path):
    _fake_ckpt(tmp_path / "step=000004.ckpt", 4)
    _truncate(_fake_ckpt(tmp_path / "last.ckpt", 6))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    seen = []

    def refuse(path: str) -> None:  # the CLI's provenance check: e.g. another network than the config's
        seen.append(path)
        raise ValueError("trained with other settings")

    with pytest.raises(ValueError, match="other settings"):
        apply_auto_resume(None, tmp_path, repair=True, check=refuse)
    assert seen == [str(tmp_path / "step=000004.ckpt")]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_only_hpc_names_count_in_extra_dirs(tmp_path):
    ckpt_dir, root = tmp_path / "ckpt", tmp_path / "root"
    ckpt_dir.mkdir(), root.mkdir()
    _fake_ckpt(root / "downloaded.ckpt", 50)  # someone's file in the working directory: not this run's
    (root / "broken.ckpt").write_bytes(b"half a download")
    assert apply_auto_resume(None, ckpt_dir, extra_dirs=[root]) is None


def test_resume_from_a_step_checkpoint_keeps_writing_last_ckpt(tmp_path, no_slurm):
    """A damaged last.ckpt and a step checkpoint saved before any `last`: the next save must replace last.ckpt."""
    def trainer(max_steps: int) -> Trainer:
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1)
        return Trainer(default_root_dir=tmp_path, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                       enable_progress_bar=False, enable_model_summary=False,
                       callbacks=[checkpoint, AdoptLastCheckpoint(tmp_path / "ckpt")])

    trainer(2).fit(_StepSeeded())
    ckpt = tmp_path / "ckpt"
    _truncate(ckpt / "last.ckpt")
    resume = apply_auto_resume(None, ckpt, repair=True)
    assert resume == str(ckpt / "epoch=0-step=2.ckpt")
    trainer(4).fit(_StepSeeded(), ckpt_path=resume)
    assert sorted(p.name for p in ckpt.glob("last*")) == ["last.ckpt", "last.ckpt.corrupt"]  # never last-v1.ckpt
    assert torch.load(ckpt / "last.ckpt", weights_only=False)["global_step"] == 4


def test_slurm_job_id_of_arrays(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "1001")
    assert slurm_job_id() == "1001"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1000")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert slurm_job_id() == "1000_2"


def test_bad_arguments():
    with pytest.raises(ValueError, match="SIGFOO"):
        RequeueOnSignal(signals=("SIGFOO",))
    with pytest.raises(ValueError, match="check_every_n_steps=0"):
        RequeueOnSignal(check_every_n_steps=0)


class _StepSeeded(LightningModule):
    """A tiny regression whose batch at step k is drawn from a generator seeded by (seed, k): resume is exact."""

    def __init__(self, signal_at: int | None = None, signum: int = signal.SIGUSR1) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.signal_at, self.signum = signal_at, signum

    def training_step(self, batch, batch_idx):
        generator = torch.Generator().manual_seed(1000 + self.global_step)
        x = torch.randn(32, 8, generator=generator)
        y = x.sum(dim=1, keepdim=True).sin()
        if self.signal_at is not None and self.global_step == self.signal_at:
            os.kill(os.getpid(), self.signum)  # as SLURM would, in the middle of a step
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return DataLoader(range(10_000), batch_size=1)


def _trainer(root: Path, callbacks: list, max_steps: int = 8) -> Trainer:
    checkpoint = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1000, save_last=False)
    return Trainer(default_root_dir=root, max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoint, *callbacks])


@pytest.fixture
def no_slurm(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SLURM_"):
            monkeypatch.delenv(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise comparisons: no load-dependent thread counts in MKL (see _fit below)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_saves_stops_and_resumes_exactly(tmp_path, no_slurm, signum):
    torch.manual_seed(0)
    reference = _StepSeeded()
    _trainer(tmp_path / "ref", []).fit(reference)

    torch.manual_seed(0)
    callback = RequeueOnSignal()
    trainer = _trainer(tmp_path / "run", [callback])
    with pytest.raises(RequeueExit) as stop:
        trainer.fit(_StepSeeded(signal_at=3, signum=signum))
    assert stop.value.code == EXIT_REQUEUE
    assert callback.stopped_at_step == 4 and trainer.global_step == 4  # the signalled step finished, then it stopped
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    assert callback.saved_path == str(last) and not Path(str(last) + ".tmp").exists()
    assert signal.getsignal(signum) is not callback._handler  # handlers restored

    resume = apply_auto_resume(None, tmp_path / "run" / "ckpt")
    assert resume == str(last)
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed = _StepSeeded()
    trainer = _trainer(tmp_path / "run", [RequeueOnSignal()])
    trainer.fit(resumed, ckpt_path=resume)
    assert trainer.global_step == 8
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_requeue_calls_scontrol_under_slurm(tmp_path, no_slurm, monkeypatch):
    log_file = tmp_path / "scontrol.log"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log_file}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    callback = RequeueOnSignal()
    with pytest.raises(RequeueExit) as stop:
        _trainer(tmp_path, [callback]).fit(_StepSeeded(signal_at=1))
    assert log_file.read_text().split() == ["requeue", "4242"]
    assert callback.stopped_at_step == 2 and stop.value.code == EXIT_OK

    log_file.unlink()
    with pytest.raises(RequeueExit) as stop:  # SIGTERM = scancel or preemption: save and exit, never requeue
        _trainer(tmp_path / "term", [RequeueOnSignal()]).fit(_StepSeeded(signal_at=1, signum=signal.SIGTERM))
    assert stop.value.code == EXIT_REQUEUE and not log_file.exists()

    fake.write_text("#!/bin/sh\necho 'slurm_requeue error: Access/permission denied' >&2\nexit 1\n")
    with pytest.raises(RequeueExit) as stop:
        _trainer(tmp_path / "again", [RequeueOnSignal()]).fit(_StepSeeded(signal_at=1))
    assert stop.value.code == EXIT_REQUEUE  # not requeued: the caller must restart it


# ---- end to end: `fit` of experiments/debug.yaml in a subprocess, SIGUSR1 from outside, restart, same result ----------
REPO = Path(__file__).resolve().parents[1]


def _fit(cwd: Path, shards: Path, *extra: str, new_session: bool = False,
         launcher: list[str] | None = None) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    # one thread: with several, MKL picks its thread count by machine load (MKL_DYNAMIC), which changes gemm
    # reduction order and so the last bits (measured: 4e-8 apart after 10 steps when two runs overlap on 2 cores)
    env.update(PYTHONPATH=f"{REPO}:{REPO / 'tests'}", NIT_CKPT_DIR=str(cwd / "ckpt"), OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1")  # tests/ for helpers.slow
    args = [
        "fit", "--config", str(REPO / "experiments" / "debug.yaml"),
        "--data.sources", f'[{{"path": "{shards}", "weight": 1.0}}]', "--data.tokens_per_pack", "128",
        "--trainer.max_steps", "10", "--trainer.log_every_n_steps", "1", *extra,  # debug.yaml carries RequeueOnSignal
    ]
    log_file = open(cwd / "fit.log", "ab")
    # the real entry point: NiTCLI.before_fit runs auto_resume_for_cli (pins NIT_CKPT_DIR, picks the checkpoint)
    return subprocess.Popen([sys.executable, *(launcher or []), "-m", "nit_lightning", *args], cwd=cwd, env=env,
                            stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=new_session)


def _state(path: Path) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return {"net": checkpoint["state_dict"], "ema": checkpoint["ema_state_dict"], "step": checkpoint["global_step"],
            "optimizer": checkpoint["optimizer_states"][0]["state"]}


@pytest.mark.slow
def test_fit_sigusr1_requeue_and_resume_matches_uninterrupted(tmp_path):
    import time

    shards = tmp_path / "shards"
    write_latent_shards(shards)
    reference = _fit(tmp_path / "ref", shards)  # runs alongside the interrupted one: 2 cores, half the wall time

    marks = tmp_path / "run" / "marks"  # a second ModelCheckpoint saving every step tells the test training has begun
    interrupted = _fit(tmp_path / "run", shards, "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                       f"--trainer.callbacks.dirpath={marks}", "--trainer.callbacks.every_n_train_steps=1",
                       "--trainer.callbacks.save_top_k=-1")
    deadline = time.time() + 300
    while not list(marks.glob("*step=3*.ckpt")) and interrupted.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    interrupted.send_signal(signal.SIGUSR1)
    assert interrupted.wait(300) == EXIT_REQUEUE, (tmp_path / "run" / "fit.log").read_text()[-3000:]
    last = tmp_path / "run" / "ckpt" / "last.ckpt"
    stopped = _state(last)["step"]
    assert 3 <= stopped < 10, stopped
    assert f"saving {last} at global step {stopped}" in (tmp_path / "run" / "fit.log").read_text()

    resumed = _fit(tmp_path / "run", shards)  # the same command again: auto-resume picks last.ckpt
    assert resumed.wait(300) == EXIT_OK, (tmp_path / "run" / "fit.log").read_text()[-3000:]
    assert reference.wait(300) == EXIT_OK, (tmp_path / "ref" / "fit.log").read_text()[-3000:]
    assert f"auto-resume: resuming from {last}" in (tmp_path / "run" / "fit.log").read_text()

    assert sorted(p.name for p in last.parent.glob("last*")) == ["last.ckpt"]  # overwritten in place, no last-v1
    a, b = _state(tmp_path / "ref" / "ckpt" / "last.ckpt"), _state(last)
    assert a["step"] == b["step"] == 10
    for part in ("net", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part} {key} differs after resume"
    for index, state in a["optimizer"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"][index][name]), f"optimizer state {index}.{name} differs"
    # every step's loss is logged once, the one the run stopped at too (it used to be lost: logged after the stop)
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref") and len(_losses(tmp_path / "ref")) == 10


def _losses(cwd: Path) -> dict[int, float]:
    """step -> loss/train over every TensorBoard version of a run (a restart writes the next version)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses: dict[int, float] = {}
    for version in sorted((cwd / "outputs").glob("*/version_*"), key=lambda p: int(p.name.split("_")[1])):
        events = EventAccumulator(str(version), size_guidance={"scalars": 0})
        events.Reload()
        if "loss/train" in events.Tags()["scalars"]:
            for event in events.Scalars("loss/train"):
                assert event.step not in losses, f"step {event.step} logged twice"
                losses[event.step] = event.value
    return losses


# ---- a plain `fit` stopped by SIGTERM: save first, exit non-zero ------------------------------------------------------
CALLBACKS_WITHOUT_REQUEUE = """
trainer:
  callbacks:
    - class_path: nit_lightning.training.ema.EMA
      init_args: {decay: 0.9}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: ckpt, every_n_train_steps: 1000, save_last: true}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {dirpath: marks, every_n_train_steps: 1, save_top_k: -1}
"""


@pytest.mark.slow
def test_sigterm_on_a_config_without_requeue_saves_and_exits_non_zero(tmp_path):
    """A user config without RequeueOnSignal: Lightning alone exited 0 and lost every step since the last periodic
    checkpoint (here: all of them). The CLI adds the callback, so the stop saves last.ckpt and exits 75."""
    import time

    from helpers.fit import fit_args

    shards = tmp_path / "shards"
    write_latent_shards(shards)
    (tmp_path / "callbacks.yaml").write_text(CALLBACKS_WITHOUT_REQUEUE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NIT_"))}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    args = fit_args(shards, max_steps=10_000) + ["--config", "callbacks.yaml"]
    with open(tmp_path / "fit.log", "wb") as log_file:
        run = subprocess.Popen([sys.executable, "-m", "nit_lightning", *args], cwd=tmp_path, env=env, stdout=log_file,
                               stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not list((tmp_path / "marks").glob("*step=3*.ckpt")) and run.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        run.send_signal(signal.SIGTERM)
        code = run.wait(300)
    log = (tmp_path / "fit.log").read_text()
    assert code == EXIT_REQUEUE, log[-3000:]
    assert "RequeueOnSignal added (the config has none)" in log
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"]
    assert saved >= 3, saved


def test_requeue_on_signal_is_added_once_and_never_twice(tmp_path):
    from nit_lightning.training.fault_tolerance import ensure_requeue_on_signal

    trainer = _trainer(tmp_path, [])
    added = ensure_requeue_on_signal(trainer)
    assert [c for c in trainer.callbacks if isinstance(c, RequeueOnSignal)] == [added]
    assert ensure_requeue_on_signal(trainer) is added  # the config's own is kept
    trainer.callbacks.append(RequeueOnSignal())
    with pytest.raises(ValueError, match="2 times.*drop --trainer.callbacks\\+="):
        ensure_requeue_on_signal(trainer)


def test_sigterm_before_training_exits_143_in_one_line(monkeypatch, capsys):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import nit_lightning.cli.lightning as lightning_cli

    def stopped(argv):
        raise SIGTERMException  # what Lightning's handler raises when SIGTERM comes before RequeueOnSignal's is on

    monkeypatch.setattr(lightning_cli, "run_cli", stopped)
    assert lightning_cli.main(["fit"]) == lightning_cli.EXIT_SIGTERM == 143  # SIGTERMException alone exits 0
    assert capsys.readouterr().err.strip() == "python -m nit_lightning fit: stopped by SIGTERM outside training " \
                                               "(setup, validation, test, predict); nothing was saved"


# ---- signals outside the training loop, and Ctrl-C: real `fit` processes -----------------------------------------------
def _wait_for(path_glob: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    import time

    deadline = time.time() + timeout
    while not list(path_glob.parent.glob(path_glob.name)) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)


def _processes_in_group(group: int) -> list[int]:
    """The pids of a process group's members (Linux /proc; field 5 of stat is the group)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[2]) == group:
                members.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return members


def _marks(cwd: Path) -> list[str]:
    """A second ModelCheckpoint saving every step: its files tell the test how far training is."""
    return ["--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", f"--trainer.callbacks.dirpath={cwd}/marks",
            "--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1"]


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_during_setup_is_handled_not_fatal(tmp_path, signum):
    """From process start: SIGUSR1 (the time-limit warning) during the seconds of imports and setup used to kill the
    process with nothing saved; now training saves last.ckpt after its first step (exit 75: no SLURM job to requeue
    here). SIGTERM there ends the process at once with 143 and one line, as before."""
    import time

    shards = tmp_path / "shards"
    write_latent_shards(shards)
    run = _fit(tmp_path / "run", shards)
    time.sleep(1.0)  # importing torch and Lightning alone takes longer
    run.send_signal(signum)
    code = run.wait(300)
    log = (tmp_path / "run" / "fit.log").read_text()
    if signum == signal.SIGUSR1:
        assert code == EXIT_REQUEUE, log[-3000:]
        assert "SIGUSR1 received before training started" in log
        assert torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 1
    else:
        assert code == 143, log[-3000:]
        assert "stopped by SIGTERM before training started" in log and "Traceback" not in log
        assert not (tmp_path / "run" / "ckpt" / "last.ckpt").exists()


@pytest.mark.slow
def test_ctrl_c_during_fit_saves_then_exits_130(tmp_path):
    """Ctrl-C used to exit 1 with nothing saved since the last periodic checkpoint; now it saves like SIGTERM."""
    shards = tmp_path / "shards"
    write_latent_shards(shards)
    run = _fit(tmp_path / "run", shards, "--trainer.max_steps=10000", *_marks(tmp_path / "run"))
    _wait_for(tmp_path / "run" / "marks" / "*step=3*.ckpt", run)
    run.send_signal(signal.SIGINT)
    code = run.wait(300)
    log = (tmp_path / "run" / "fit.log").read_text()
    assert code == 130, log[-3000:]
    saved = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    assert saved >= 3 and f"at global step {saved}" in log and "stopped by Ctrl-C" in log


@pytest.mark.slow
def test_ctrl_c_at_the_terminal_with_loader_workers_saves_and_leaves_no_process(tmp_path):
    """A terminal's Ctrl-C signals the whole foreground process group: the loader's worker processes get SIGINT too.
    The run must still save and exit 130 in one line, without a worker's KeyboardInterrupt traceback, and no worker
    may outlive it."""
    shards = tmp_path / "shards"
    write_latent_shards(shards, num_samples=32)  # 4 shards: at least one per worker
    run = _fit(tmp_path / "run", shards, "--trainer.max_steps=10000", "--data.num_workers=2",
               *_marks(tmp_path / "run"), new_session=True)  # its own process group, like a shell's foreground job
    _wait_for(tmp_path / "run" / "marks" / "*step=3*.ckpt", run)
    group = os.getpgid(run.pid)
    assert len(_processes_in_group(group)) >= 3, "the run and its two loader workers"
    os.killpg(group, signal.SIGINT)
    code = run.wait(300)
    log = (tmp_path / "run" / "fit.log").read_text()
    assert code == 130, log[-3000:]
    assert "stopped by Ctrl-C" in log and "Traceback" not in log and "KeyboardInterrupt" not in log, log[-3000:]
    saved = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    assert saved >= 3 and f"at global step {saved}" in log
    with pytest.raises(ProcessLookupError):  # every process of the group is gone, workers included
        os.killpg(group, 0)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["lightning", "torchrun"])
def test_ctrl_c_at_the_terminal_stops_two_ddp_ranks_at_one_step_with_last_ckpt_saved(tmp_path, launcher):
    """Two DDP ranks (gloo, CPU), launched by Lightning (`--trainer.devices 2`) or by torchrun, all in one process
    group that gets the terminal's SIGINT (torchrun also forwards one to its workers). Both ranks stop at the same
    step, last.ckpt of that step is saved, and no process outlives the run. Lightning's launch exits 130; torchrun
    reports any signal as its own failure (a SignalException traceback, exit 1) after the ranks have saved."""
    shards = tmp_path / "shards"
    write_latent_shards(shards, num_samples=64)
    ddp = ["--trainer.max_steps=10000", "--trainer.devices=2", "--trainer.strategy=ddp", *_marks(tmp_path / "run")]
    prefix = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"] if launcher == "torchrun" else []
    run = _fit(tmp_path / "run", shards, *ddp, new_session=True, launcher=prefix)
    _wait_for(tmp_path / "run" / "marks" / "*step=3*.ckpt", run)
    group = os.getpgid(run.pid)
    os.killpg(group, signal.SIGINT)
    code = run.wait(300)
    log = (tmp_path / "run" / "fit.log").read_text()
    assert code == (1 if launcher == "torchrun" else 130), log[-3000:]
    saved = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)["global_step"]
    assert saved >= 3 and log.count(f"saving {tmp_path / 'run' / 'ckpt' / 'last.ckpt'} at global step {saved}") == 2
    assert "stopped by Ctrl-C (SIGINT); exit code 130" in log, log[-3000:]
    with pytest.raises(ProcessLookupError):
        os.killpg(group, 0)


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    import time

    shards = tmp_path / "shards"
    write_latent_shards(shards)
    run = _fit(tmp_path / "run", shards, "--trainer.max_steps=10000", *_marks(tmp_path / "run"),
               "--trainer.callbacks+=helpers.slow.SlowSteps", "--trainer.callbacks.seconds=2.0")  # both in one step
    _wait_for(tmp_path / "run" / "marks" / "*step=2*.ckpt", run)
    time.sleep(0.5)  # step 3 has begun: both land in its 2 s, before the next step boundary
    run.send_signal(signal.SIGINT)
    time.sleep(0.3)
    run.send_signal(signal.SIGINT)
    code = run.wait(30)
    log = (tmp_path / "run" / "fit.log").read_text()
    assert code == 130, log[-3000:]
    assert "SIGINT again: stopping at once, without saving" in log and "RequeueOnSignal: SIGINT" not in log
    assert not (tmp_path / "run" / "ckpt" / "last.ckpt").exists()


def test_rank_0_waits_for_the_ranks_it_launched_and_kills_one_that_hangs(caplog):
    """training/launched_ranks.py: a rank that ends is waited for; one still running at the deadline is killed."""
    import time
    from types import SimpleNamespace

    from nit_lightning.training.launched_ranks import wait_for_launched_ranks

    quick = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    trainer = SimpleNamespace(strategy=SimpleNamespace(launcher=SimpleNamespace(procs=[quick, hung])))
    start = time.monotonic()
    wait_for_launched_ranks(trainer, timeout=2.0)
    assert quick.returncode == 0 and hung.returncode is not None and hung.returncode < 0
    assert time.monotonic() - start < 10 and f"rank process {hung.pid} still runs" in caplog.text
    wait_for_launched_ranks(SimpleNamespace(strategy=SimpleNamespace(launcher=None)), timeout=1.0)  # srun/torchrun
