"""Sample-grid callback: a tiny Trainer run logs grids to TensorBoard with the EMA weights; direct hook calls."""
from __future__ import annotations

import contextlib
import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from nit_lightning.data.codecs import PixelCodec
from nit_lightning.generation.settings import SamplerSettings
from nit_lightning.models import build_nit
from nit_lightning.training.sample_grid import SampleGridCallback, make_grid


class TinyModule(pl.LightningModule):
    """Holds `net` as NiTModule does; the training step only nudges the weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = build_nit("NiT-debug", in_channels=12, num_classes=4)
        for p in self.net.parameters():
            p.data.normal_(0, 0.1)

    def training_step(self, batch, batch_idx):
        return sum((p**2).sum() for p in self.net.parameters()) * 1e-3

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class TinyData(pl.LightningDataModule):
    codec_description = PixelCodec(2).describe()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=1)


class FakeEMA(pl.Callback):
    """Has the EMA callback's `swapped_in(pl_module)`: zeros the final layer (v = 0: images are the start noise)."""

    def __init__(self):
        self.entered = 0

    @contextlib.contextmanager
    def swapped_in(self, pl_module):
        self.entered += 1
        layer = pl_module.net.final_layer.linear
        backup = {k: v.detach().clone() for k, v in layer.state_dict().items()}
        for p in layer.parameters():
            p.data.zero_()
        try:
            yield
        finally:
            layer.load_state_dict(backup)


def _callback(**kw):
    args = dict(every_n_steps=2, sizes=["8x8", "4x12"], classes=[0, 1, 2], tokens_per_forward=64,
                sampler=SamplerSettings(steps=2, cfg_scale=2.0, cfg_interval=(0.0, 0.7)))
    return SampleGridCallback(**{**args, **kw})


def test_trainer_run_logs_grids_with_ema(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ema, grid_cb = FakeEMA(), _callback(save_dir=str(tmp_path / "grids"))
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="tb"),
                         callbacks=[ema, grid_cb], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(TinyModule(), datamodule=TinyData())
    assert ema.entered == 2  # step 2 and train end (step 3), both with the EMA weights
    acc = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0}).Reload()
    assert sorted(acc.Tags()["images"]) == ["samples/4x12", "samples/8x8"]
    assert [e.step for e in acc.Images("samples/8x8")] == [2, 3]
    # 3 images of 8x8 in one row with 2-pixel padding: (8+2)·1+2 = 12 rows, (8+2)·3+2 = 32 columns.
    assert (acc.Images("samples/8x8")[0].height, acc.Images("samples/8x8")[0].width) == (12, 32)
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == [
        "step0000002_4x12.png", "step0000002_8x8.png", "step0000003_4x12.png", "step0000003_8x8.png"]


def test_generate_direct_live_weights_fixed_seeds(caplog):
    module, cb = TinyModule(), _callback(codec="pixel:2")
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[cb])
    module.net.train()
    with caplog.at_level(logging.WARNING):
        a = cb.generate(trainer, module)
        b = cb.generate(trainer, module)
    assert module.net.training  # train mode restored
    assert caplog.text.count("live weights") == 1  # said once
    assert a.keys() == {"8x8", "4x12"} and a["4x12"].shape == (3, 4 + 2 * 2, 3 * (12 + 2) + 2)
    for name in a:
        assert torch.equal(a[name], b[name])  # fixed seeds and classes
    ema_trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[FakeEMA(), cb])
    with_ema = cb.generate(ema_trainer, module)
    assert not torch.equal(with_ema["8x8"], a["8x8"])
    assert torch.equal(cb.generate(trainer, module)["8x8"], a["8x8"])  # live weights restored after the swap


def test_bad_settings_fail_early():
    module, trainer = TinyModule(), pl.Trainer(accelerator="cpu", logger=False)
    trainer.datamodule = TinyData()
    with pytest.raises(ValueError, match="7x8 is not a multiple of 2"):
        _callback(sizes=["7x8"]).setup(trainer, module, "fit")
    with pytest.raises(ValueError, match="must lie in 0..3"):
        _callback(classes=[0, 9]).setup(trainer, module, "fit")
    with pytest.raises(ValueError, match="needs a codec"):
        _callback().setup(pl.Trainer(accelerator="cpu", logger=False), module, "fit")


def test_make_grid_layout():
    ims = [torch.full((3, 2, 3), v, dtype=torch.uint8) for v in (10, 20, 30)]
    g = make_grid(ims, nrow=2, padding=1)
    assert g.shape == (3, 2 * 3 + 1, 2 * 4 + 1)
    assert g[0, 1, 1] == 10 and g[0, 1, 5] == 20 and g[0, 4, 1] == 30 and g[0, 4, 5] == 0 and g[0, 0, 0] == 0
