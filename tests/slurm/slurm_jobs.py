"""Jobs on the test cluster: submit the project's sbatch scripts, watch, signal, requeue, and read what they left.

Every job a test submits is remembered in SUBMITTED, so that a failing test prints each job's log tail and
`scontrol show job` (tests/slurm/conftest.py).
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[2]
ENDED = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                   "DEADLINE", "PREEMPTED"})
SUBMITTED: list["Job"] = []


class JobError(AssertionError):
    """A job did not do what the scenario expects (the conftest prints its log tail and scontrol show job)."""


@dataclass
class Job:
    id: str
    env: dict[str, str]
    logs: list[Path] = field(default_factory=list)  # .out/.err with %x/%j/%A/%a resolved (array: every task's)

    def scontrol(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise JobError(f"scontrol {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def info(self) -> list[dict[str, str]]:
        """`scontrol show job -o` as one dict per (array) job record."""
        records = []
        for line in self.scontrol("show", "job", "-o", self.id).splitlines():
            records.append(dict(re.findall(r"(\S+?)=(\S*)", line)))
        return records

    @property
    def state(self) -> str:
        return self.info()[0]["JobState"]

    @property
    def restarts(self) -> int:
        return int(self.info()[0]["Restarts"])

    def exit_code(self) -> tuple[int, int]:
        code, sig = self.info()[0]["ExitCode"].split(":")
        return int(code), int(sig)

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not ready():
            if time.time() > deadline:
                raise JobError(f"job {self.id}: timed out after {timeout:.0f} s waiting for {what} (state {self.state})")
            time.sleep(0.25)

    def wait_running(self, timeout: float = 120) -> None:
        self.wait_until(lambda: self.state == "RUNNING", timeout, "RUNNING")

    def wait_ended(self, timeout: float = 300) -> str:
        self.wait_until(lambda: all(r["JobState"] in ENDED for r in self.info()), timeout, "the end")
        return self.state

    def signal(self, name: str, batch: bool = False) -> None:
        """`scancel --signal=NAME` to the job's steps (the tasks), or with batch=True to the batch shell only."""
        subprocess.run(["scancel", f"--signal={name}", *(["--batch"] if batch else []), self.id], env=self.env,
                       check=True)

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], env=self.env, check=True)

    def restart_when_requeued(self, restarts: int, timeout: float = 180, **update: str) -> None:
        """Wait for the requeue (Restarts reaches `restarts`, job PENDING), apply `update` (scontrol update
        KEY=VALUE, e.g. NumNodes), and skip SLURM's requeue delay (StartTime=now)."""
        self.wait_until(lambda: self.restarts >= restarts and self.state == "PENDING", timeout,
                        f"requeue #{restarts}")
        if update:
            self.scontrol("update", f"JobId={self.id}", *(f"{k}={v}" for k, v in update.items()))
        self.scontrol("update", f"JobId={self.id}", "StartTime=now")

    def pids(self) -> list[int]:
        """Process ids of the job's `python -m nit_lightning` tasks on either node (both live on this host; `scontrol
        listpids` sees one node only): found by their SLURM_JOB_ID and SLURM_STEP_ID."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if b"nit_lightning" not in (entry / "cmdline").read_bytes():
                    continue
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"SLURM_JOB_ID={self.id}".encode() in environ and any(v.startswith(b"SLURM_STEP_ID=") for v in environ):
                pids.append(int(entry.name))
        return pids

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def diagnostics(self, lines: int = 60) -> str:
        parts = [f"==== scontrol show job {self.id}\n" + self.scontrol("show", "job", self.id, check=False)]
        for path in self.logs:
            text = path.read_text(errors="replace").splitlines() if path.exists() else ["(missing)"]
            parts.append(f"==== tail of {path}\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)


def sbatch(script: str, *options: str, env: dict[str, str], log_dir: Path | None = None,
           variables: dict[str, str] | None = None) -> Job:
    """Submit slurm/<script> unchanged from the repository root. Resources come as sbatch options; the script's own
    settings as environment variables (sbatch exports the submitting environment: --export=ALL is the default).
    log_dir: pass --output/--error there, else the script's own default (slurm/logs/)."""
    job_env = {**env, **(variables or {})}
    logs = []
    args = ["sbatch", "--parsable", *options]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        array = any(o.startswith("--array") for o in options) or "#SBATCH --array" in (REPO / "slurm" / script).read_text()
        stem = "%x-%A_%a" if array else "%x-%j"
        args += [f"--output={log_dir}/{stem}.out", f"--error={log_dir}/{stem}.err"]
    result = subprocess.run([*args, f"slurm/{script}"], cwd=REPO, env=job_env, capture_output=True, text=True)
    if result.returncode != 0:
        raise JobError(f"sbatch {script} {' '.join(options)} failed: {result.stderr.strip()}")
    job = Job(result.stdout.strip().split(";")[0], env)
    SUBMITTED.append(job)
    for record in job.info():
        for key in ("StdOut", "StdErr"):
            path = Path(record.get(key, ""))
            if str(path) and path not in job.logs:
                job.logs.append(path if path.is_absolute() else Path(record.get("WorkDir", REPO)) / path)
    return job


def array_logs(job: Job) -> None:
    """Array tasks get their log names once they start: refresh the list."""
    for record in job.info():
        for key in ("StdOut", "StdErr"):
            path = Path(record.get(key, ""))
            if str(path) and path not in job.logs:
                job.logs.append(path)


# ---- what a training job left ----------------------------------------------------------------------------------------
def checkpoint_state(path: Path) -> dict:
    """What must match bitwise after a resume: weights, EMA, AdamW state (and the step)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return {"step": checkpoint["global_step"], "net": checkpoint["state_dict"], "ema": checkpoint["ema_state_dict"],
            "optimizer": checkpoint["optimizer_states"][0]["state"]}


def assert_same_state(a: dict, b: dict, what: str) -> None:
    if a["step"] != b["step"]:
        raise JobError(f"{what}: global step {b['step']}, the uninterrupted run {a['step']}")
    for part in ("net", "ema"):
        if a[part].keys() != b[part].keys():
            raise JobError(f"{what}: {part} keys differ")
        for key in a[part]:
            if not torch.equal(a[part][key], b[part][key]):
                raise JobError(f"{what}: {part} {key} differs from the uninterrupted run")
    for index, state in a["optimizer"].items():
        for name, value in state.items():
            if not torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"][index][name])):
                raise JobError(f"{what}: optimizer state {index}.{name} differs from the uninterrupted run")


def logged_losses(log_dir: Path, tag: str = "loss/train") -> dict[int, float]:
    """step -> loss from every TensorBoard version under log_dir; a later version (a restart) wins a step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses: dict[int, float] = {}
    versions = sorted(log_dir.glob("*/version_*"), key=lambda p: int(p.name.split("_")[1]))
    for version in versions:
        accumulator = EventAccumulator(str(version), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            losses.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return losses


def pack_records(pack_dir: Path) -> list[dict]:
    """PackLog records of every rank and restart: {"rank", "step", "epoch", "keys", "tokens"}."""
    records = []
    for path in sorted(pack_dir.glob("packs_rank*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def steps_done(pack_dir: Path) -> int:
    """The highest training step rank 0 has finished (PackLog), 0 before the first."""
    path = pack_dir / "packs_rank0.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return max((json.loads(line)["step"] for line in lines), default=0)


# ---- train_xl.sbatch with the tiny CPU config ------------------------------------------------------------------
STEPS = 30  # 13 steps per epoch on 2 ranks: the runs cross an epoch boundary
CPU = ("--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=1G", "--time=15")


def train(name: str, work: Path, data, env: dict, *, nodes: int = 2, options: tuple[str, ...] = (),
          probe: str = "", default_logs: bool = False) -> tuple[Job, Path]:
    """Submit train_xl.sbatch on `nodes` nodes × 1 CPU task: debug.yaml on the test shards, STEPS steps."""
    run = work / name
    extra = (f"--trainer.max_steps={STEPS} --trainer.log_every_n_steps=1 "
             f"--trainer.callbacks+=nit_lightning.training.callbacks.PackLog --trainer.callbacks.dirpath={run}/packs "
             + probe)
    variables = {"CONFIG": "experiments/debug.yaml", "SOURCES": f"[{{path: {data.native}, weight: 1.0}}]",
                 "DATA_DIR": str(data.layout), "LOG_DIR": str(run / "logs"), "CKPT_DIR": str(run / "ckpt"),
                 "EXTRA_ARGS": extra}
    job = sbatch("train_xl.sbatch", f"--nodes={nodes}", *CPU, *options, env=env, variables=variables,
                 log_dir=None if default_logs else run / "slurm")
    return job, run


def hold(run: Path, step: int) -> str:
    return (f" --trainer.callbacks+=slurm_probes.HoldAtStep --trainer.callbacks.step={step}"
            f" --trainer.callbacks.marker={run}/held")


def wait_for_marker(job: Job, marker: Path, timeout: float = 240) -> None:
    job.wait_until(lambda: Path(f"{marker}.0").exists() or job.state not in ("PENDING", "RUNNING"), timeout,
                   f"{marker.name}")
    if not Path(f"{marker}.0").exists():
        raise JobError(f"job {job.id} ended ({job.state}) before reaching {marker.name}")


def assert_matches_reference(reference: Path, run: Path, what: str) -> None:
    assert_same_state(checkpoint_state(reference / "ckpt" / "last.ckpt"), checkpoint_state(run / "ckpt" / "last.ckpt"),
                      what)
    expected, got = logged_losses(reference / "logs"), logged_losses(run / "logs")
    assert len(expected) == STEPS, f"the reference logged {len(expected)} losses"
    differing = {step: (expected[step], got.get(step)) for step in expected if got.get(step) != expected[step]}
    assert not differing, f"{what}: logged losses differ from the uninterrupted run at (step: (ref, run)) {differing}"
