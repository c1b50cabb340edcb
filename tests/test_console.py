"""What a run prints: the progress bar counts epochs of a max_steps run without "/-2", the summary has no FLOPs."""
from __future__ import annotations

import io

import torch
from lightning.pytorch import LightningModule, Trainer
from rich.console import Console

from nit_lightning.training.console import ModelSummary, ProgressBar


def test_progress_bar_of_a_max_steps_run_has_no_negative_epoch_count():
    def bar_of(**limits) -> ProgressBar:
        bar = ProgressBar()
        bar._trainer = Trainer(accelerator="cpu", logger=False, callbacks=[bar], enable_checkpointing=False, **limits)
        return bar

    # what a config with max_steps gives during fit (Lightning fills max_epochs=-1 in: no epoch bound)
    assert bar_of(max_steps=200, max_epochs=-1)._get_train_description(9).strip() == "Epoch 9"  # was "Epoch 9/-2"
    assert bar_of(max_epochs=5)._get_train_description(2).strip() == "Epoch 2/4"


def test_model_summary_prints_no_flops(monkeypatch):
    class Module(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(4, 3)

    out = io.StringIO()
    monkeypatch.setattr("rich.get_console", lambda: Console(file=out, width=120))
    summary = ModelSummary()
    trainer = Trainer(accelerator="cpu", logger=False, callbacks=[summary], enable_checkpointing=False)
    module = Module()
    module.trainer = trainer  # what the summary reads of the module; no fit needed
    summary.on_fit_start(trainer, module)
    text = out.getvalue()
    assert "net" in text and "Linear" in text and "Trainable params: 15" in text
    assert "FLOPs" not in text  # Lightning printed "Total FLOPs: 0": it counts an example input this model lacks
