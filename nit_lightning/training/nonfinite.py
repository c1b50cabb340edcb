"""What a training step does with a non-finite loss: stop naming the step and the batch ("raise"), or skip the optimiser
step loudly and count it ("skip") up to a bound. Without the bound, a run whose every step was non-finite exited 0
("max_steps reached") and wrote checkpoints of untrained weights. Two bounds: a fraction of the run's steps (slow
drift), and a streak of consecutive skipped steps, which stops a run that has stopped training long before its
first periodic checkpoint (1% of a 400k-step run is 4000 steps, two checkpoints of a paper config)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

MIN_STEPS_FOR_A_FRACTION = 100  # without max_steps, a fraction of the steps so far means something from here on


class TooManySkippedSteps(RuntimeError):
    """on_nonfinite=skip skipped more than max_skipped_steps_fraction of the run's steps: the run stops."""


@dataclass
class NonFinitePolicy:
    mode: str = "raise"  # "raise" | "skip"
    max_fraction: float = 0.01  # of max_steps (as strict as the data's max_skipped_fraction by default)
    max_consecutive: int = 10  # skipped steps in a row (0: no streak bound)
    skipped: int = 0
    streak: int = 0  # skipped steps since the last finite one (not checkpointed: a resume starts a new streak)

    def __post_init__(self) -> None:
        if self.mode not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {self.mode!r}")
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ValueError(f"max_skipped_steps_fraction={self.max_fraction} must be in [0, 1] (0.01: stop past 1%)")
        if self.max_consecutive < 0:
            raise ValueError(f"max_consecutive_skipped_steps={self.max_consecutive} must be >= 0 (0: no bound)")

    def finite(self) -> None:
        """A step with a finite loss: the streak of skipped steps ends."""
        self.streak = 0

    def handle(self, loss: float, where: str, keys: list[str], *, taken: int, max_steps: int) -> None:
        """A non-finite `loss` at `where`: raise (mode raise, or past the bound) or count it. `taken`: optimiser steps
        taken so far; `max_steps`: the run's (<= 0: unbounded)."""
        if self.mode == "raise":
            raise FloatingPointError(
                f"non-finite loss {loss} at {where}; batch keys {keys}. Look at those samples or lower the lr; "
                "model.on_nonfinite=skip skips such steps instead (one process only)"
            )
        self.skipped += 1
        self.streak += 1
        log.warning("skipping %s: non-finite loss %s, batch keys %s (%d skipped so far, %d in a row)", where, loss,
                    keys, self.skipped, self.streak)
        if 0 < self.max_consecutive < self.streak:
            raise TooManySkippedSteps(
                f"{self.streak} steps in a row were skipped for a non-finite loss (the last at {where}), more than "
                f"model.max_consecutive_skipped_steps={self.max_consecutive}: the run is not training. Look at the "
                "batch keys in the warnings, lower the lr, or raise model.max_consecutive_skipped_steps"
            )
        attempted = taken + self.skipped
        if max_steps > 0:
            limit, of = self.max_fraction * max_steps, f"trainer.max_steps={max_steps}"
        elif attempted >= MIN_STEPS_FOR_A_FRACTION:
            limit, of = self.max_fraction * attempted, f"the {attempted} steps so far"
        else:
            return
        if self.skipped > limit:
            raise TooManySkippedSteps(
                f"{self.skipped} steps were skipped for a non-finite loss (the last at {where}), more than "
                f"model.max_skipped_steps_fraction={self.max_fraction:g} of {of}: the run is not training. Look at "
                "the batch keys in the warnings, lower the lr, or raise model.max_skipped_steps_fraction"
            )
