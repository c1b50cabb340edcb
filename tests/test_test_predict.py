"""`test` and `predict` subcommands: test loss on --data.test_sources, per-image losses, EMA weights swapped in."""
from __future__ import annotations

import pytest
import torch

from helpers.fit import fit_args
from helpers.shards import write_latent_shards
from nit_lightning.cli.lightning import main as cli_main
from nit_lightning.cli.lightning import run_cli
from nit_lightning.data.datamodule import NativeLatentDataModule
from nit_lightning.diffusion.flow import FlowMatchingLoss
from nit_lightning.models import build_nit


def test_per_image_loss_matches_each_image_alone_in_token_weighting():
    """per_image[i] is image i's mean over its own tokens; the token-reduced loss is their token-weighted mean."""
    net = build_nit("NiT-debug", in_channels=4, num_classes=3)
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    hw = torch.tensor([[2, 3], [4, 1], [1, 1]])
    x0 = torch.randn(11, 4)
    out = FlowMatchingLoss()(net, x0, torch.tensor([0, 1, 2]), hw, generator=torch.Generator().manual_seed(0))
    seqlens = hw.prod(-1).double()
    assert out.per_image.shape == (3,) and not out.per_image.requires_grad
    weighted = (out.per_image.double() * seqlens).sum() / seqlens.sum()
    torch.testing.assert_close(weighted, out.loss.detach().double(), rtol=1e-6, atol=1e-6)


def test_datamodule_asks_for_the_split_it_lacks(tmp_path):
    shards = write_latent_shards(tmp_path / "train", num_samples=8)
    dm = NativeLatentDataModule(sources=[{"path": str(shards)}], tokens_per_pack=64, num_workers=0)
    with pytest.raises(ValueError, match="test_sources"):
        dm.test_dataloader()
    with pytest.raises(ValueError, match="test_sources or --data.val_sources"):
        dm.predict_dataloader()


@pytest.mark.slow
def test_fit_then_test_and_predict_from_the_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train = write_latent_shards(tmp_path / "train", num_samples=16)
    held_out = write_latent_shards(tmp_path / "test", num_samples=10, seed=5)
    args = fit_args(train, max_steps=3)
    cli_main(args)
    ckpt = next(tmp_path.rglob("last.ckpt"))
    common = args[1:]  # the same config and overrides, another subcommand
    common = [a for a in common if a not in ("--trainer.max_steps", "3")]
    test_sources = f'[{{"path": "{held_out}"}}]'
    cli_main(["test", *common, "--data.test_sources", test_sources, "--ckpt_path", str(ckpt)])
    metrics = sorted(p.name for p in tmp_path.rglob("events.out.tfevents*"))
    assert metrics, "test wrote no TensorBoard events"
    run = run_cli(["predict", *common, "--data.test_sources", test_sources, "--ckpt_path", str(ckpt)])
    predictions = run.trainer.predict_loop.predictions
    keys = [k for batch in predictions for k in batch["keys"]]
    losses = torch.cat([batch["loss"] for batch in predictions])
    # keys are <source>/<shard>/<sample>: every held-out image scored once
    assert sorted(k.rsplit("/", 1)[-1] for k in keys) == [f"s{i:05d}" for i in range(10)]
    assert losses.shape == (10,) and torch.isfinite(losses).all()
