"""What a run prints: Lightning's rich progress bar and model summary, less the parts that mislead for this suite.

The experiment configs list both (`nit_lightning.training.console.ProgressBar`, `.ModelSummary`) in place of
Lightning's `RichProgressBar` and default summary.
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import RichModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar; its "Epoch 9/-2" (max_epochs - 1) for a run bounded by max_steps (max_epochs
    is then -1) reads "Epoch 9"."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{max(len(self.validation_description), len(description))}}"


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary without its FLOPs: Lightning counts them on the module's `example_input_array`,
    which a model of packed sequences has none of, and printed "Total FLOPs: 0". ThroughputMonitor logs the model
    FLOPs utilisation of the real packs (`perf/mfu`, given the GPU's peak)."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int, **kwargs: Any) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name or " ", justify="right" if name in ("Params", "Params per Device") else "left")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        console.print(f"Trainable params: {get_human_readable_count(trainable_parameters).strip()}, non-trainable: "
                      f"{get_human_readable_count(total_parameters - trainable_parameters).strip()}, parameter size "
                      f"{get_formatted_model_size(model_size)} MB; modules in train mode: "
                      f"{total_training_modes['train']}, in eval mode: {total_training_modes['eval']}")
