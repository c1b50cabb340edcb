"""The signals that stop a run, caught from process start to exit: SIGUSR1, SIGTERM, SIGINT.

SIGUSR1 is SLURM's time-limit warning (`--signal=SIGUSR1@120`), SIGTERM preemption, `scancel` or `scontrol requeue`,
SIGINT Ctrl-C. `python -m nit_lightning fit|validate|test|predict` installs the handler before torch is imported
(this module is stdlib only), so a signal never finds the default action, which would kill the process with nothing
saved. The handler records and writes one line to stderr (no locks: safe in a handler); what a signal does depends on
where the run is (`phase`, moved on by training.fault_tolerance.RequeueOnSignal):

  setup     SIGUSR1 is kept: training saves last.ckpt after its first step, then requeues.
            SIGTERM / SIGINT end the process at once with exit 143 / 130: there is nothing to save yet.
  training  the first signal is kept: RequeueOnSignal saves last.ckpt at the next step boundary and exits.
            A second SIGINT ends the process at once (130), without saving.
  finished  the last step is done and its checkpoints are written: SIGUSR1 is ignored (nothing is left to requeue);
            SIGTERM / SIGINT end the process at once.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Iterable

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + the signal, what a shell reports for it
PHASES = ("setup", "training", "finished")


class _State:
    def __init__(self) -> None:
        self.phase = "setup"
        self.received: int | None = None  # the first stop signal of this run
        self.counts: dict[int, int] = {}
        self.previous: dict[int, Any] = {}  # handlers we replaced, restored by uninstall()
        self.process_wide = False  # installed by the entry point: kept until the process exits


STATE = _State()


def _say(message: str) -> None:
    os.write(2, f"{message}\n".encode())  # not print/logging: they take locks the interrupted code may hold


def handle(signum: int, _frame: Any) -> None:
    """The handler: record, or end the process where waiting for a step boundary makes no sense (module doc)."""
    name = signal.Signals(signum).name
    STATE.counts[signum] = STATE.counts.get(signum, 0) + 1
    if STATE.phase == "training":
        if signum == signal.SIGINT and STATE.counts[signum] > 1:
            _say(f"{name} again: stopping at once, without saving")
            os._exit(EXIT_CODES[signum])
        if STATE.received is None:
            STATE.received = signum
            _say(f"{name} received: saving last.ckpt at the next training step, then stopping")
        return
    if signum == signal.SIGUSR1:
        if STATE.phase == "setup":
            STATE.received = STATE.received or signum
            _say(f"{name} received before training started: last.ckpt is saved (and the job requeued) at the "
                 "first training step")
        else:
            _say(f"{name} received after the last training step: the run is complete, nothing to save or requeue")
        return
    when = "before training started (nothing to save yet)" if STATE.phase == "setup" else \
        "after the last training step (its checkpoints are written)"
    _say(f"stopped by {name} {when}")
    raise SystemExit(EXIT_CODES.get(signum, 128 + signum))


def install(signals: Iterable[int] = STOP_SIGNALS, *, process_wide: bool = False) -> None:
    """Route `signals` to `handle` (main thread only). process_wide: the entry point's call, never undone."""
    if threading.current_thread() is not threading.main_thread():
        return
    STATE.process_wide = STATE.process_wide or process_wide
    for signum in signals:
        current = signal.getsignal(signum)
        if current is not handle:
            STATE.previous.setdefault(signum, current)
            signal.signal(signum, handle)


def uninstall() -> None:
    """Give the replaced handlers back, unless the entry point installed ours for the whole process."""
    if STATE.process_wide or threading.current_thread() is not threading.main_thread():
        return
    for signum, previous in STATE.previous.items():
        if signal.getsignal(signum) is handle:  # whoever replaced ours since (Lightning's teardown) knows better
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    STATE.previous = {}


def set_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r} is not one of {PHASES}")
    STATE.phase = phase


def new_run() -> None:
    """A new `fit` in the same process (tests): forget the signals of the last one."""
    STATE.phase, STATE.received, STATE.counts = "setup", None, {}
