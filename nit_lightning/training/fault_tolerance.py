"""Stop cleanly on a signal: save last.ckpt at the next step boundary, requeue under SLURM, exit with a code that
says so.

A `fit` stopped by `RequeueOnSignal` ends by raising `RequeueExit` (a SystemExit), so the process exits with:
  0   stopped and requeued by `scontrol requeue` (SLURM restarts the job itself);
  75  stopped at a checkpoint but not requeued by us (not under SLURM, SIGTERM, requeue=False, or scontrol failed):
      `last.ckpt` is written, run the same command again to resume (75 = EX_TEMPFAIL of sysexits.h, "retry");
  130 stopped by Ctrl-C (SIGINT) after saving last.ckpt (a second Ctrl-C exits at once, without saving).
The signals are caught from process start to exit (nit_lightning/stop_signals.py); this callback acts on them at
the end of a training batch, after every other callback's batch end (the CLI puts it last), the step's metrics logged
first: Lightning's own mid-epoch checkpoint point, which it resumes from exactly. Raising
(rather than `trainer.should_stop`) keeps epoch-end and train-end hooks from running after the save: they would mark
the epoch complete (ModelCheckpoint's train-end `last` save would then skip the rest of the epoch on resume) and
could start long work (sampling, evaluation) inside SLURM's 120 s grace window.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Sequence

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from nit_lightning import stop_signals
from nit_lightning.training.checkpoints import checkpoint_dir_of, save_checkpoint_atomic

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped at a checkpoint, run again to resume
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, what a shell reports for it


class RequeueExit(SystemExit):
    """Raised at a batch end after the requeue checkpoint is written; its code is the process exit code."""


def ensure_requeue_on_signal(trainer: Trainer) -> "RequeueOnSignal":
    """Exactly one RequeueOnSignal in the trainer: the configs' own, else a default one added (logged).

    Without it Lightning's SIGTERM handler stops a `fit` mid-epoch with exit code 0 and nothing saved since the last
    periodic checkpoint. Two would each install handlers and race for the flag: refused, naming the usual cause.
    It goes last in the list: its stop at a batch end then comes after every other callback's batch end (the EMA
    update, periodic checkpoints, pack logs, throughput metrics of that step).
    """
    found = [c for c in trainer.callbacks if isinstance(c, RequeueOnSignal)]
    if len(found) > 1:
        raise ValueError(f"RequeueOnSignal is in the trainer's callbacks {len(found)} times: the experiment configs carry "
                         "it now, so drop --trainer.callbacks+=nit_lightning.training.fault_tolerance.RequeueOnSignal")
    callback = found[0] if found else RequeueOnSignal()
    if found:
        trainer.callbacks.remove(callback)
    else:
        rank_zero_info(f"RequeueOnSignal added (the config has none): SIGUSR1/SIGTERM/SIGINT save last.ckpt, then exit "
                       f"{EXIT_REQUEUE} (SIGINT {EXIT_INTERRUPTED}) or requeue")
    trainer.callbacks.append(callback)
    return callback


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` wants: `<array job>_<task>` inside an array, else SLURM_JOB_ID."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


class RequeueOnSignal(Callback):
    """On SIGUSR1/SIGTERM/SIGINT: at the next batch end save last.ckpt atomically, `scontrol requeue` under SLURM,
    exit.

    The signal handler (stop_signals.handle) only records; ranks agree on it with one boolean all-reduce every
    `check_every_n_steps` batches, so all ranks stop at the same step even if the signal reached them apart.
    Only `requeue_signals` (SIGUSR1: SLURM's time-limit warning) call `scontrol requeue`; SIGTERM saves and exits
    without it, since it comes from `scancel` (the user wants the job gone) or from preemption (SLURM requeues a job
    preempted with PreemptMode=REQUEUE itself); SIGINT saves and exits 130. A signal that came before training is
    acted on after the first step; one during or after the last step changes nothing: the run ends as usual
    (stop_signals). Lightning's own SLURM auto-requeue is switched off (logged).
    """

    def __init__(
        self,
        signals: Sequence[str] = ("SIGUSR1", "SIGTERM", "SIGINT"),
        requeue_signals: Sequence[str] = ("SIGUSR1",),
        dirpath: str | None = None,
        filename: str = "last.ckpt",
        requeue: bool = True,
        check_every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        self.signals = [self._parse_signal(name) for name in signals]
        self.requeue_signals = {self._parse_signal(name) for name in requeue_signals}
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps={check_every_n_steps} must be >= 1")
        self.dirpath, self.filename, self.requeue = dirpath, filename, requeue
        self.check_every_n_steps = check_every_n_steps
        self.stopped_at_step: int | None = None
        self.saved_path: str | None = None
        self.exit_code = EXIT_OK
        self._handler = stop_signals.handle

    @staticmethod
    def _parse_signal(name: str) -> signal.Signals:
        try:
            return signal.Signals[name] if isinstance(name, str) else signal.Signals(name)
        except (KeyError, ValueError) as error:
            raise ValueError(f"unknown signal {name!r}; use names like 'SIGUSR1', 'SIGTERM'") from error

    @property
    def received(self) -> int | None:
        """The first of our signals this run received (stop_signals records it), None before any."""
        received = stop_signals.STATE.received
        return received if received in self.signals else None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # runs before Lightning registers its signal handlers (Trainer._run), so its SLURM handler never installs
        if stop_signals.STATE.phase == "finished":
            stop_signals.new_run()  # an earlier fit of this process (tests); `python -m` runs one
        environment = trainer._accelerator_connector.cluster_environment
        if isinstance(environment, SLURMEnvironment):
            # Lightning checks --nodes / --ntasks-per-node against the Trainer only for processes it launches itself;
            # under srun a mismatch (num_nodes=1 on 2 nodes) would silently plan data for the wrong world size.
            environment.validate_settings(num_devices=trainer.num_devices, num_nodes=trainer.num_nodes)
            tasks = int(os.environ.get("SLURM_NTASKS", trainer.num_nodes * trainer.num_devices))
            if tasks != trainer.num_nodes * trainer.num_devices:  # e.g. requeued onto fewer nodes, srun kept the count
                raise ValueError(
                    f"SLURM started {tasks} tasks (SLURM_NTASKS) but the trainer expects num_nodes × devices = "
                    f"{trainer.num_nodes} × {trainer.num_devices}: the tasks would train apart, each writing the same "
                    "checkpoints. Launch one task per device: srun --ntasks=<nodes × devices> --ntasks-per-node=<devices>"
                    " (slurm/train_xl.sbatch does)")
        if isinstance(environment, SLURMEnvironment) and environment.auto_requeue:
            environment.auto_requeue = False
            log.info("RequeueOnSignal: Lightning's SLURM auto_requeue switched off; this callback handles requeue")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after Lightning's handlers (registered before the stage runs): ours replace its SIGTERM handler, which would
        # raise SIGTERMException mid-step before the checkpoint is written. `python -m nit_lightning` installed ours at
        # process start already (Lightning's then wraps it); a Trainer inside another program gets it from here on.
        stop_signals.install(self.signals)
        stop_signals.set_phase("training")
        log.info("RequeueOnSignal: handling %s", ", ".join(s.name for s in self.signals))

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> None:
        if self.stopped_at_step is not None or trainer.global_step % self.check_every_n_steps:
            return
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        if 0 < trainer.max_steps <= trainer.global_step:
            return  # that was the last step: training ends as usual, with its checkpoints (_finish says so)
        # Lightning logs a step's metrics after the batch-end hooks, which the stop skips: this step's go out now
        # (else the resumed run's log would lack the step it stopped at)
        trainer._logger_connector.update_train_step_metrics()
        self._stop_for_requeue(trainer)

    def _stop_for_requeue(self, trainer: Trainer) -> None:
        name = signal.Signals(self.received).name if self.received is not None else "a signal on another rank"
        path = Path(self.dirpath) if self.dirpath else checkpoint_dir_of(trainer)
        path = path / self.filename
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
        trainer.strategy.barrier("requeue_mkdir")
        log.warning("RequeueOnSignal: %s received; saving %s at global step %d", name, path, trainer.global_step)
        for callback in trainer.checkpoint_callbacks:
            # a ModelCheckpoint that saves `last` in the same place takes this file as its own (recorded in the
            # checkpoint), so after resume it overwrites last.ckpt instead of writing last-v1.ckpt beside it
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath and \
                    Path(callback.dirpath).resolve() == path.parent.resolve() and \
                    callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION == path.name:
                callback.last_model_path = str(Path(callback.dirpath) / path.name)
        save_checkpoint_atomic(trainer, path)
        self.saved_path, self.stopped_at_step = str(path), trainer.global_step
        result = self._requeue() if trainer.is_global_zero else None
        self.exit_code = int(trainer.strategy.broadcast(result, src=0))
        raise RequeueExit(self.exit_code)

    def _requeue(self) -> int:
        if self.received == signal.SIGINT:
            log.warning("RequeueOnSignal: stopped by Ctrl-C (SIGINT); exit code %d: run again to resume",
                        EXIT_INTERRUPTED)
            return EXIT_INTERRUPTED
        job_id = slurm_job_id()
        why = ("requeue=False" if not self.requeue else "no SLURM_JOB_ID" if job_id is None
               else None if self.received in self.requeue_signals
               else f"{signal.Signals(self.received).name if self.received else 'no signal on rank 0'} is not one of "
                    f"requeue_signals")
        if why is not None:
            log.warning("RequeueOnSignal: not requeued (%s); exit code %d: run again to resume", why, EXIT_REQUEUE)
            return EXIT_REQUEUE
        try:
            result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            log.error("RequeueOnSignal: `scontrol requeue %s` failed to run: %s; exit code %d", job_id, error,
                      EXIT_REQUEUE)
            return EXIT_REQUEUE
        if result.returncode != 0:
            log.error("RequeueOnSignal: `scontrol requeue %s` returned %d: %s; exit code %d", job_id,
                      result.returncode, result.stderr.strip(), EXIT_REQUEUE)
            return EXIT_REQUEUE
        log.warning("RequeueOnSignal: requeued SLURM job %s", job_id)
        return EXIT_OK

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._finish()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._finish()  # Lightning skips the teardown hooks when fit ends by an exception (ours included)

    def _finish(self) -> None:
        if stop_signals.STATE.phase == "training" and self.received is not None and self.stopped_at_step is None:
            log.warning("RequeueOnSignal: %s came after the last training step: the run is complete, nothing to "
                        "requeue", signal.Signals(self.received).name)
        stop_signals.set_phase("finished")  # the handler stays (process-wide) until exit: a late signal is ignored
        stop_signals.uninstall()  # ... unless fit runs inside another program (tests): its handlers come back
