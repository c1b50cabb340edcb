"""Rank 0 waits for the ranks it launched. With `--trainer.devices N` (no torchrun or srun), Lightning starts ranks
1..N-1 as child processes of rank 0 and never waits for them: rank 0's exit code came back while rank 1 was still
tearing down (measured: 1–2 s after a Ctrl-C stop), so a shell, a script or a SLURM step saw the run end before all
of its processes had. Under torchrun or srun the launcher waits itself and there are no children here."""
from __future__ import annotations

import logging
import subprocess
import time
from typing import Any

log = logging.getLogger(__name__)

AFTER_SUCCESS_S = 120.0  # a rank finishing its teardown (process group, loggers) after rank 0
AFTER_FAILURE_S = 15.0  # a rank stuck in a collective that rank 0 left: killed sooner, the failure is already known


def wait_for_launched_ranks(trainer: Any, timeout: float) -> None:
    """Wait up to `timeout` seconds in all for the child processes Lightning launched; kill any still running then."""
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    deadline = time.monotonic() + timeout
    for proc in list(getattr(launcher, "procs", None) or []):
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("rank process %d still runs %.0f s after rank 0 finished: killing it", proc.pid, timeout)
            proc.kill()
            proc.wait()
