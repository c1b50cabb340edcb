"""slurm/train_xl.sbatch and slurm/train_b_ablation.sbatch on a real two-node cluster, with a tiny CPU config.

Every interrupted run is requeued under the same job id, resumes by itself and must end bitwise equal to the
uninterrupted run (weights, EMA, AdamW state, every logged loss). The scripts are used unchanged: resources come as
sbatch options, the config and data through the scripts' own variables (CONFIG, SOURCES, DATA_DIR, LOG_DIR, CKPT_DIR,
EXTRA_ARGS), probes (slurm_probes.py) through EXTRA_ARGS.
"""
from __future__ import annotations

import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from nit_lightning.records import CheckpointMeta
from slurm_jobs import (
    REPO, STEPS, Job, array_logs, assert_matches_reference, hold, pack_records, sbatch, train, wait_for_marker,
)

def test_two_nodes_train_to_the_end(reference):
    checkpoint = torch.load(reference / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == STEPS
    records = pack_records(reference / "packs")
    assert Counter(r["rank"] for r in records) == {0: STEPS, 1: STEPS}  # two ranks, one process group
    # SOURCES replaced train_xl's three folder names: exactly the one source given was trained on
    sources = CheckpointMeta.from_checkpoint(checkpoint).data["sources"]
    assert [s["path"] for s in sources] == [str((reference.parent / "data" / "imagenet" / "native").resolve())]
    # the job's logs went to slurm/logs/ (git-ignored), not into the repository root
    for path in map(Path, (reference / "job_logs.txt").read_text().split()):
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO).returncode == 0
        assert path.parent == REPO / "slurm" / "logs" and ignored, f"job log {path}: not in slurm/logs or not ignored"
    out = next(reference.glob("*.out")).read_text()
    assert "2 nodes x 1 tasks per node" in out and "GPUs" not in out.splitlines()[0], out.splitlines()[0]
    assert "/-2" not in out and "Total FLOPs: 0" not in out, out[-2000:]  # "Epoch 1/-2", FLOPs of no input


@pytest.mark.parametrize("how", ["usr1-to-tasks", "usr1-to-batch-shell", "scontrol-requeue"])
def test_preemption_requeues_and_resumes_bitwise(how, reference, work, data, job_env):
    run = work / how
    job, run = train(how, work, data, job_env, probe=hold(run, 5))
    wait_for_marker(job, run / "held")
    if how == "usr1-to-tasks":
        job.signal("USR1")  # what `#SBATCH --signal=SIGUSR1@120` sends
    elif how == "usr1-to-batch-shell":
        job.signal("USR1", batch=True)  # what `#SBATCH --signal=B:USR1@120` sends
    else:
        job.scontrol("requeue", job.id)  # an administrator, or preemption with PreemptMode=REQUEUE
    job.restart_when_requeued(1)
    assert job.wait_ended() == "COMPLETED"
    assert job.restarts == 1
    log = job.log_text()
    assert "auto-resume: resuming from" in log and "saving" in log
    assert_matches_reference(reference, run, how)


def test_time_limit_requeues_and_resumes_bitwise(reference, work, data, job_env):
    """A real time limit of 1 minute, its warning 45 s before (SLURM checks limits every 30 s: the signal comes 15 to
    45 s after the start); the run holds at step 3 until it arrives."""
    run = work / "time-limit"
    job, run = train("time-limit", work, data, job_env, probe=hold(run, 3),
                     options=("--time=1", "--signal=SIGUSR1@45"))
    job.restart_when_requeued(1, timeout=150, TimeLimit="15")
    assert job.wait_ended() == "COMPLETED"
    assert "User defined signal" not in job.log_text()
    assert_matches_reference(reference, run, "time limit")


def test_stray_usr1_during_setup_loses_nothing(reference, work, data, job_env):
    job, run = train("usr1-setup", work, data, job_env)
    job.wait_until(lambda: len(job.pids()) == 2, 120, "the two python tasks")
    time.sleep(1.0)  # imports take seconds: the tasks are still setting up
    assert not (run / "packs").exists(), "the tasks had started training already"
    job.signal("USR1")
    job.restart_when_requeued(1)
    assert job.wait_ended() == "COMPLETED"
    assert "before training started" in job.log_text()
    assert_matches_reference(reference, run, "USR1 during setup")


def test_stray_usr1_after_the_last_step_ends_well(reference, work, data, job_env):
    run = work / "usr1-after-last-step"
    probe = f" --trainer.callbacks+=slurm_probes.PauseAtTeardown --trainer.callbacks.marker={run}/teardown"
    job, run = train("usr1-after-last-step", work, data, job_env, probe=probe)
    wait_for_marker(job, run / "teardown")
    job.signal("USR1")
    assert job.wait_ended() == "COMPLETED" and job.exit_code() == (0, 0)
    assert job.restarts == 0
    assert "after the last training step" in job.log_text()
    assert_matches_reference(reference, run, "USR1 after the last step")


def test_scancel_stops_with_a_checkpoint_and_no_requeue(work, data, job_env):
    run = work / "scancel"
    job, run = train("scancel", work, data, job_env, probe=hold(run, 5))
    wait_for_marker(job, run / "held")
    job.cancel()
    assert job.wait_ended() == "CANCELLED"
    time.sleep(3)  # nothing may requeue it
    assert job.state == "CANCELLED" and job.restarts == 0
    log = job.log_text()
    assert "Exited with exit code 75" in log  # the tasks saved and said so
    # held after step 5: the stop comes at the start of step 6, last.ckpt is the state after step 5
    assert torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 5


def test_resume_on_one_node_then_two_sees_every_image_once(reference, work, data, job_env):
    """2 nodes -> requeued onto 1 node -> requeued onto 2 nodes, all inside epoch 0: the rest of the epoch is split
    over the new process count; no image of the epoch is seen twice, none is skipped."""
    run = work / "resize"
    job, run = train("resize", work, data, job_env, probe=hold(run, 3))
    wait_for_marker(job, run / "held")
    job.signal("USR1")
    job.restart_when_requeued(1, NumNodes="1", NumTasks="1")
    job.wait_running()
    job.wait_until(lambda: any(r["step"] >= 8 for r in pack_records(run / "packs")) or job.state != "RUNNING", 240,
                   "step 8 on one node")
    job.signal("USR1")
    job.restart_when_requeued(2, NumNodes="2", NumTasks="2")
    assert job.wait_ended() == "COMPLETED"
    log = job.log_text()
    assert "1 nodes x 1 tasks" in log and log.count("2 nodes x 1 tasks") == 2
    records = pack_records(run / "packs")
    assert max(r["step"] for r in records) == STEPS
    ranks_by_step = Counter(r["step"] for r in records)
    assert 1 in ranks_by_step.values() and 2 in ranks_by_step.values()  # steps on one and on two processes
    epoch0 = [key for r in records if r["epoch"] == 0 for key in r["keys"]]
    seen = Counter(k.rsplit("/", 1)[-1] for k in epoch0)
    assert max(seen.values()) == 1, f"seen twice in epoch 0: {[k for k, n in seen.items() if n > 1]}"
    # every epoch-0 sample the two resumes did not drop (at most one pack of leftovers per resume) was trained on
    assert len(seen) >= data.num_images - 2 * max(len(r["keys"]) for r in records), sorted(seen)
    # epoch 1 was planned afresh on 2 processes: the same packs, step for step, as the uninterrupted run's
    # (records come rank file by rank file, and this run reaches STEPS earlier in epoch 1 than the reference does,
    # so compare each rank's sequence of packs with the same rank's in the reference, from the epoch's start)
    for rank in (0, 1):
        ref_epoch1 = [r["keys"] for r in pack_records(reference / "packs") if r["epoch"] == 1 and r["rank"] == rank]
        epoch1 = [r["keys"] for r in records if r["epoch"] == 1 and r["rank"] == rank]
        assert epoch1 and epoch1 == ref_epoch1[: len(epoch1)], f"rank {rank}"
    # losses are not the 2-process run's (half the batch for a while): the run is a different one, but complete
    assert torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == STEPS


def test_ablation_array_trains_each_variant_on_its_data(work, data, job_env):
    out = work / "ablation"
    variables = {"CONFIG": "experiments/debug.yaml", "DATA_DIR": str(data.layout), "OUT_DIR": str(out),
                 "EXTRA_ARGS": "--trainer.max_steps=4"}
    job = sbatch("train_b_ablation.sbatch", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15", env=job_env,
                 variables=variables, log_dir=out / "slurm")
    job.wait_until(lambda: all(r["JobState"] in ("COMPLETED", "FAILED", "CANCELLED") for r in job.info())
                   and len(job.info()) == 3, 400, "the three array tasks")
    array_logs(job)
    assert {r["JobState"] for r in job.info()} == {"COMPLETED"}
    expected = {"native": ["native"], "mix": ["native", "fixed256", "fixed512"], "fixed": ["fixed256", "fixed512"]}
    for variant, folders in expected.items():
        checkpoint = torch.load(out / f"nit_b_ablation_{variant}" / "checkpoints" / "last.ckpt", map_location="cpu",
                                weights_only=True)
        assert checkpoint["global_step"] == 4
        sources = [s["path"] for s in CheckpointMeta.from_checkpoint(checkpoint).data["sources"]]
        assert sources == [str((data.layout / f).resolve()) for f in folders], variant
